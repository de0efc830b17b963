"""Validation bits per byte on held-out documents (the base model's headline number besides CORE).

The held-out documents are those training never reads: the first data.val_docs documents of the text
source (llm.data.sources). Each is encoded after a bos, the stream is cut into rows of
sequence_len + 1 tokens (the tail that does not fill a row is dropped), and the model's loss on every
next token goes into BitsPerByte, whose sums are added up across ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from llm.evaluate.bpb import BitsPerByte
from llm.evaluate.sharding import Shard
from llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class BpbResult:
    bpb: float
    tokens: int  # predicted tokens, over every rank

    def to_dict(self) -> dict:
        return {"val_bpb": self.bpb, "val_bpb_tokens": self.tokens}


def heldout_rows(tokenizer: Tokenizer, texts: Iterable[str], row_len: int, max_tokens: int | None = None
                 ) -> torch.Tensor:
    """(N, row_len) token rows from bos-delimited documents, holding at most max_tokens tokens."""
    if row_len < 2:
        raise ValueError(f"row_len={row_len}: a row needs an input and a target token")
    limit = None if max_tokens is None else max(row_len, max_tokens)
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, prepend_bos=True))
        if limit is not None and len(stream) >= limit:
            break
    stream = stream[:limit]
    n = len(stream) // row_len
    if n == 0:
        raise ValueError(f"the held-out documents hold {len(stream)} tokens, fewer than one row of {row_len}; "
                         f"hold out more documents (data.val_docs)")
    return torch.tensor(stream[:n * row_len], dtype=torch.long).view(n, row_len)


@torch.no_grad()
def evaluate_bpb(model: nn.Module, tokenizer: Tokenizer, rows: torch.Tensor, batch_size: int = 8,
                 shard: Shard = Shard(), progress: bool = True) -> BpbResult:
    device = next(model.parameters()).device
    metric = BitsPerByte(tokenizer.token_bytes()).to(device)
    for batch in shard.progress(shard.batches(len(rows), batch_size), "val bpb", progress):
        x = rows[batch.start:batch.stop].to(device)
        losses = model(x[:, :-1], targets=x[:, 1:], reduction="none")
        metric.update(losses, x[:, 1:])
    return BpbResult(float(metric.compute()), rows.numel() - len(rows))
