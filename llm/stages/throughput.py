"""Tokens/s and MFU (model FLOPs utilisation), logged every optimizer step.

Tokens are the real tokens the stage trained on (each training_step returns them, llm/stages/common.py:
no padding; for RL the policy rows' prompt and answer tokens), summed over the micro-batches of a step
and over every rank. MFU = those tokens x the model's training FLOPs per token / time / the devices'
peak matmul FLOP/s. GPUs use Lightning's table of datasheet peaks; a CPU has no datasheet number we can
trust, so we measure its matmul peak once. The running total goes into checkpoints (resume keeps counting)
and the artifact's metrics.json (`tokens`).
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


def measure_matmul_flops(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """Best observed FLOP/s of a square matmul on the CPU (what `bench/` reports as the peak). Its own random
    generator: measuring (the run plan does it before the model exists) must not move the seeded global one."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
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
    """Logs train/tokens_per_sec and train/mfu (all ranks together) after every optimizer step."""

    def __init__(self):
        self.flops_per_token = 0.0
        self.peak: float | None = None
        self.total_tokens = 0  # every rank's, since the run began (resumes included)
        self._step_tokens = 0  # this rank's, since the last optimizer step
        self._last: float | None = None
        self._last_step = 0

    def on_train_start(self, trainer, pl_module):
        self.flops_per_token = pl_module.model.flops_per_token()
        self.peak = peak_flops(pl_module.device, trainer.precision)
        if self.peak:
            self.peak *= trainer.world_size
        self._last, self._last_step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._step_tokens += int(outputs["tokens"])
        steps = trainer.global_step - self._last_step
        if steps <= 0:  # still accumulating gradients
            return
        local = torch.tensor(float(self._step_tokens), device=pl_module.device)
        tokens = int(trainer.strategy.reduce(local, reduce_op="sum"))  # every rank calls this, every step
        self._step_tokens = 0
        self.total_tokens += tokens
        now = time.perf_counter()
        tokens_per_sec = tokens / (now - self._last)
        metrics = {"train/tokens_per_sec": tokens_per_sec}
        if self.peak:
            metrics["train/mfu"] = tokens_per_sec * self.flops_per_token / self.peak
        pl_module.log_dict(metrics, prog_bar=True, rank_zero_only=True)
        self._last, self._last_step = now, trainer.global_step

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_tokens = int(state_dict["total_tokens"])
