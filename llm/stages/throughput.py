"""Tokens/s and MFU (model FLOPs utilisation), logged every optimizer step.

MFU = achieved model FLOP/s / the device's peak matmul FLOP/s. GPUs use Lightning's table of
datasheet peaks; a CPU has no datasheet number we can trust, so we measure its matmul peak once.
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a square matmul on the CPU (what `bench/` reports as the peak)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b  # warm up the kernels and thread pool
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> float | None:
    dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float32
    if device.type == "cpu":
        return measure_matmul_flops(dtype)
    return get_available_flops(device, dtype)


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_sec (all ranks) and train/mfu after every optimizer step."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = 0.0
        self.peak: float | None = None
        self._last: float | None = None
        self._last_step = 0

    def on_train_start(self, trainer, pl_module):
        self.flops_per_token = pl_module.model.flops_per_token()
        self.peak = peak_flops(pl_module.device, trainer.precision)
        if self.peak:
            self.peak *= trainer.world_size
        self._last, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = trainer.global_step - self._last_step
        if steps <= 0:  # still accumulating gradients
            return
        now = time.perf_counter()
        tokens_per_sec = steps * self.tokens_per_step / (now - self._last)
        metrics = {"train/tokens_per_sec": tokens_per_sec}
        if self.peak:
            metrics["train/mfu"] = tokens_per_sec * self.flops_per_token / self.peak
        pl_module.log_dict(metrics, prog_bar=True, rank_zero_only=True)
        self._last, self._last_step = now, trainer.global_step
