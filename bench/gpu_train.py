"""Base-stage training on one GPU: tokens/s, MFU and peak memory at the largest micro-batch that fits.

    python bench/gpu_train.py --depths 12 20 --compile off on [--seq 2048] [--steps 10] [--fsdp]

Each (depth, compile) trains the real PretrainModule through Lightning (bf16-mixed, vocab 32768, random
token rows already on the device) at T=--seq, with the largest power-of-two micro-batch that does not run
out of memory (tried from --max-batch down). tokens/s is the median step's; MFU divides by Lightning's
datasheet bf16 peak of the device; peak memory is torch.cuda.max_memory_allocated over the timed steps.
--fsdp adds FSDP2 (ModelParallelStrategy, fully_shard per block) on the one device at the deepest depth.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, IterableDataset

from llm.model.gpt import GPT, GPTConfig
from train_throughput import VOCAB, base_module  # bench/ is on the path when a script here runs


class DeviceRows(IterableDataset):
    """Random token rows made once on the GPU: the figure is the model, not the data path."""

    def __init__(self, B: int, T: int):
        self.rows = torch.randint(0, VOCAB, (4, B, T + 1), device="cuda")

    def __iter__(self):
        i = 0
        while True:
            yield {"tokens": self.rows[i % len(self.rows)], "cursor": torch.zeros(4, dtype=torch.long)}
            i += 1


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args):
        torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        if trainer.global_step == self.warmup:
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, *args):
        torch.cuda.synchronize()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def train(config: GPTConfig, B: int, steps: int, warmup: int, compile: bool, fsdp: bool) -> dict:
    module = base_module(config, steps + warmup, compile)
    timer = StepTimer(warmup)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if fsdp else "auto"
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed",
                        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, DataLoader(DeviceRows(B, config.sequence_len), batch_size=None))
    step = sorted(timer.times)[len(timer.times) // 2]
    return {"step_s": step, "tokens_per_s": B * config.sequence_len / step,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def largest_batch(config: GPTConfig, max_batch: int, compile: bool, fsdp: bool, steps: int, warmup: int) -> tuple:
    B = max_batch
    while B >= 1:
        try:
            return B, train(config, B, steps, warmup, compile, fsdp)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            B //= 2
    raise RuntimeError(f"d{config.n_layer} does not fit one row of {config.sequence_len} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 20])
    parser.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fsdp", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    peak = get_available_flops(device, torch.bfloat16)
    print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}; bf16 datasheet peak "
          f"{(peak or 0) / 1e12:.0f} TFLOP/s; T={args.seq}, vocab {VOCAB}")
    for depth in args.depths:
        config = GPTConfig.from_depth(depth, vocab_size=VOCAB, sequence_len=args.seq)
        B = None
        for compile in [c == "on" for c in args.compile]:
            if B is None:  # the search runs eagerly; compiled runs take the batch it found (no recompiles)
                B, r = largest_batch(config, args.max_batch, compile, False, args.steps, args.warmup)
            else:
                r = train(config, B, args.steps, args.warmup, compile, False)
            report(f"d{depth} compile={'on' if compile else 'off'}", config, B, r, peak, args.seq)
        if args.fsdp and depth == max(args.depths):
            report(f"d{depth} FSDP2 1 device", config, B, train(config, B, args.steps, args.warmup, False, True),
                   peak, args.seq)


def report(label: str, config: GPTConfig, B: int, r: dict, peak: float | None, seq: int) -> None:
    mfu = r["tokens_per_s"] * _flops_per_token(config) / peak if peak else float("nan")
    print(f"{label:24s} batch {B:3d} x {seq}: {r['tokens_per_s']:10,.0f} tokens/s  MFU {100 * mfu:5.1f}%  "
          f"peak memory {r['peak_gb']:6.1f} GiB  ({r['step_s'] * 1e3:.0f} ms/step)", flush=True)


def _flops_per_token(config: GPTConfig) -> float:
    with torch.device("meta"):
        return GPT(config).flops_per_token()


if __name__ == "__main__":
    main()
