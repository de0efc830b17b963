"""ChatModule: mid-training and SFT on rendered conversations (stage=mid, stage=sft).

Everything but the batch and the metrics is PretrainModule's: optimizer and schedule, FSDP2 and
compile, the artifact. The model starts from an earlier stage's weights (llm.train loads
stage.init_from and hands them in as init_state). A batch comes from ChatDataModule: inputs and
targets where every token the assistant did not write is -1, so the loss counts only what the
model must learn to say. Validation reports, on held-out conversations and over those same tokens:
the loss, bits per byte and next-token accuracy, each summed over all ranks before it is divided.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.stages.base import PretrainModule
from llm.tokenizer import Tokenizer

_LR_FIELDS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")


def scale_learning_rates(optimizer: OptimizerConfig, scale: float) -> OptimizerConfig:
    """The optimizer config with every learning rate times `scale` (nanochat's init_lr_frac)."""
    if scale <= 0:
        raise ValueError(f"stage.module.lr_scale={scale}: use a positive fraction of the optimizer's rates, e.g. 0.02")
    return replace(optimizer, **{name: getattr(optimizer, name) * scale for name in _LR_FIELDS})


class ChatModule(PretrainModule):
    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer, total_steps: int,
                 lr_scale: float = 1.0, **kwargs):
        super().__init__(model_config, scale_learning_rates(optimizer, lr_scale), tokenizer, total_steps, **kwargs)
        self.hparams["lr_scale"] = lr_scale
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        inputs = batch["inputs"]
        loss = self._forward(inputs, targets=batch["targets"])
        self._report_consumed(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=inputs.size(0))
        self.log("train/epoch", batch["epoch"], batch_size=inputs.size(0))  # passes over the mixture
        return loss

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
