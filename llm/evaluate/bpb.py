"""Bits per byte: the tokenizer-independent language-modelling loss.

bpb = (sum of per-token losses in nats) / (ln 2 * sum of the UTF-8 bytes those tokens stand for).
Special tokens stand for no bytes and are left out of both sums, as nanochat does, so models with
different vocabularies can be compared.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class BitsPerByte(Metric):
    full_state_update = False

    def __init__(self, token_bytes: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("token_bytes", token_bytes.long(), persistent=False)
        self.add_state("nats", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_losses: torch.Tensor, targets: torch.Tensor) -> None:
        """token_losses: (B, T) loss in nats of predicting targets (B, T); targets < 0 are ignored."""
        valid = targets >= 0
        nbytes = torch.where(valid, self.token_bytes[targets.clamp(min=0)], 0)
        counted = nbytes > 0
        self.nats += token_losses.double()[counted].sum()
        self.bytes += nbytes.sum()

    def compute(self) -> torch.Tensor:
        return self.nats / (math.log(2) * self.bytes.clamp(min=1))
