"""ChatModule: mid-training and SFT on rendered conversations (stage=mid, stage=sft).

Everything but the batch and the metrics is StageModule's (llm/stages/common.py): optimizer and
schedule, FSDP2 and compile, the artifact. The model starts from an earlier stage's weights (llm.train
loads stage.init_from and hands them in as init_state). A batch comes from ChatDataModule: inputs and
targets where every token the assistant did not write is -1, so the loss counts only what the model
must learn to say. Validation reports, on held-out conversations and over those same tokens: the loss,
bits per byte and next-token accuracy, each summed over all ranks before it is divided.
"""

from __future__ import annotations

import torch.nn.functional as F
from torchmetrics import MeanMetric

from llm.evaluate.bpb import BitsPerByte
from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.stages.common import StageModule
from llm.tokenizer import Tokenizer


class ChatModule(StageModule):
    batch_unit = "rows"

    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer, total_steps: int,
                 **shared):
        super().__init__(model_config, optimizer, tokenizer, total_steps, **shared)
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_bpb = BitsPerByte(tokenizer.token_bytes())

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        inputs = batch["inputs"]
        loss = self._forward(inputs, targets=batch["targets"])
        self.report_consumed(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs.size(0))
        self.log("train/epoch", batch["epoch"], batch_size=inputs.size(0))  # passes over the mixture
        return {"loss": loss, "tokens": int(batch["tokens"])}  # the rows' real tokens, padding left out

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        inputs, targets = batch["inputs"], batch["targets"]
        logits = self._forward(inputs)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                                 reduction="none").view_as(targets)
        learned = targets != -1
        # per-token values: the synced mean weighs every assistant token equally, whatever its batch
        self.val_loss.update(losses[learned])
        self.val_accuracy.update((logits.argmax(-1) == targets)[learned].float())
        self.val_bpb.update(losses, targets)
        size = inputs.size(0)
        self.log("val/loss", self.val_loss, batch_size=size)
        self.log("val/token_accuracy", self.val_accuracy, batch_size=size)
        self.log("val/bpb", self.val_bpb, prog_bar=True, batch_size=size)
