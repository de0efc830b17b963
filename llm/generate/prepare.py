"""Preparing a model that only samples: the precision it decodes in and the head it decodes with.

`for_inference(model, precision)` is what the CLI, the server and the benchmarks call after loading an
artifact; the Generator works with any GPT, prepared or not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.model.gpt import GPT

PRECISIONS = ("auto", "fp32", "bf16-head", "bf16")


class DecodeHead(nn.Module):
    """The unembedding as the engine runs it (for_inference installs it as model.lm_head).

    Two things the training-time nn.Linear can't do:
    - last_only: a prefill discards its logits (rows feed their last prompt token in the first step),
      so while DecodeBatch prefills, the head computes the last position only. At 32k tokens the
      (rows x prompt x vocab) logits and their soft-cap were ~3/4 of a prefill's time and most of its memory.
    - bfloat16 on a CPU, prepacked for oneDNN: decoding a small model is bound by reading this
      vocab x width matrix for every token (about half of a d4 step in float32). bfloat16 halves its
      bytes, and a weight reordered once into oneDNN's blocked layout (what torch.compile's CPU
      "freezing" does) multiplies ~2x faster again than a plain bfloat16 F.linear.
    The weight keeps its name (lm_head.weight) and is shared, not copied, when its dtype is unchanged
    (so a tied head still is the embedding table).
    """

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = weight if dtype in (None, weight.dtype) else \
            nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        self.last_only = False
        self.packed = None
        if self.weight.dtype == torch.bfloat16 and self.weight.device.type == "cpu":
            try:  # torch.ops.mkldnn is an internal API: use it only where it exists and works
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
                probe = torch.ones(1, 1, self.weight.size(1), dtype=torch.bfloat16)
                if torch.allclose(self._packed_linear(probe, packed).float(),
                                  F.linear(probe, self.weight.detach()).float(), rtol=1e-2, atol=1e-2):
                    self.packed = packed
            except (AttributeError, RuntimeError):
                pass

    @staticmethod
    def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_only:
            x = x[:, -1:]
        x = x.to(self.weight.dtype)
        return F.linear(x, self.weight) if self.packed is None else self._packed_linear(x, self.packed)


def for_inference(model: GPT, precision: str = "auto") -> GPT:
    """Put a model that only samples (CLI, server, benchmarks) in eval mode and the fastest precision.

    lm_head becomes a DecodeHead (see there) in every case. fp32: weights as they are. bf16: every
    weight in bfloat16 (the rotary tables stay float32), so activations and the KV cache are bfloat16
    too. bf16-head: only an untied lm_head in bfloat16, the rest float32 (the small matmuls in the
    blocks are fastest in float32 on a CPU). auto: bf16 on CUDA, bf16-head on a CPU with native
    bfloat16, else fp32. Logits come out float32 in every case. Changes `model` in place: for models
    loaded to sample, not for one being trained.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
    device = model.lm_head.weight.device
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16"
        elif device.type == "cpu" and torch.backends.mkldnn.is_available() and \
                torch.ops.mkldnn._is_mkldnn_bf16_supported():
            precision = "bf16-head"
        else:
            precision = "fp32"
    if precision == "bf16-head" and (model.config.tie_embeddings or device.type != "cpu"):
        precision = "fp32"  # a tied head *is* the embedding table; bfloat16 there would reach the blocks
    if precision == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    if not isinstance(model.lm_head, DecodeHead):
        model.lm_head = DecodeHead(model.lm_head.weight, torch.bfloat16 if precision == "bf16-head" else None)
    model.precision = precision
    return model.eval()
