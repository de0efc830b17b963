"""Masked loss on held-out conversations: the chat stages' validation set, for any artifact.

    python -m llm.eval source=base tasks=[chat_loss]     # the same conversations for every artifact

The conversations are conf/data/_chat_val.yaml's val_tasks, the set mid-training and SFT validate on;
the base model never saw the chat format, so this shows what those stages bought on exactly that data.
Each conversation is one row (rendered, cut to the model's context, padded); the loss counts only what
the assistant writes, summed over every rank's rows before it is divided (so ranks change nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchmetrics import SumMetric

from llm.conversation import Conversation
from llm.data.chat import render_row
from llm.evaluate.sharding import Shard
from llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class ChatLossResult:
    loss: float  # mean nats per assistant token
    tokens: int  # assistant tokens scored, over every rank
    conversations: int

    def to_dict(self) -> dict:
        return {"chat_loss": self.loss, "chat_loss_tokens": self.tokens, "chat_loss_conversations": self.conversations}


@torch.no_grad()
def evaluate_chat_loss(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Conversation],
                       batch_size: int, shard: Shard = Shard(), progress: bool = True) -> ChatLossResult:
    device = next(model.parameters()).device
    seq_len = model.config.sequence_len
    nats, count = (SumMetric().set_dtype(torch.float64).to(shard.device) for _ in range(2))
    for batch in shard.progress(shard.batches(len(conversations), batch_size), "chat loss", progress):
        rows = [render_row(tokenizer, conversations[i], seq_len) for i in batch]
        inputs = torch.tensor([r[0] for r in rows], device=device)
        targets = torch.tensor([r[1] for r in rows], device=device)
        nats.update(model(inputs, targets=targets, reduction="sum").double())
        count.update(float((targets >= 0).sum()))
    total, tokens = float(nats.compute()), int(count.compute())
    return ChatLossResult(total / max(tokens, 1), tokens, len(conversations))
