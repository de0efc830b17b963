"""Training throughput of the base stage: tokens/s, ms/step and MFU, Lightning vs a plain loop.

    python bench/train_throughput.py                       # d4 and d6, fp32 and bf16, on this machine
    python bench/train_throughput.py --shapes d4 --compile

Shapes (vocab 32768): d4 with T=256, B=16 and d6 with T=512, B=32 (one micro-batch per step).
Data are random token rows already in memory, so the figure is the model + optimizer + Lightning
loop, not tokenization. MFU divides by the peak matmul FLOP/s measured here (printed first).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, IterableDataset

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.model.gpt import GPT, GPTConfig
from llm.optim.groups import build_optimizer
from llm.reporting.environment import cpu_name
from llm.stages.base import PretrainModule
from llm.stages.host_memory import keep_freed_memory
from llm.stages.throughput import measure_matmul_flops

CONF = Path(__file__).resolve().parents[1] / "conf"

SHAPES = {"d4": (4, 256, 16), "d6": (6, 512, 32)}  # depth, T, B
VOCAB = 32768


class RandomRows(IterableDataset):
    def __init__(self, B: int, T: int):
        self.rows = torch.randint(0, VOCAB, (8, B, T + 1), generator=torch.Generator().manual_seed(0))

    def __iter__(self):
        i = 0
        while True:
            yield {"tokens": self.rows[i % len(self.rows)], "cursor": torch.zeros(4, dtype=torch.long)}
            i += 1


class StubTokenizer:
    """Only what PretrainModule reads from a tokenizer when no samples are generated."""
    def token_bytes(self):
        return torch.ones(VOCAB, dtype=torch.long)


def base_module(config: GPTConfig, total_steps: int, compile: bool = False) -> PretrainModule:
    """The base stage's module with conf/'s optimizer and schedule (no periodic samples)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", ["stage=base", "stage.module.sample_every=0"])
    make = instantiate(cfg.stage.module, _partial_=True, _convert_="all")
    return make(model_config=config, optimizer=instantiate(cfg.optimizer, _convert_="all"), tokenizer=StubTokenizer(),
                total_steps=total_steps, compile=compile)


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, []

    def on_train_batch_start(self, trainer, *args):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.t0)


def lightning_ms_per_step(config, B, T, precision, steps, warmup, compile) -> float:
    module = base_module(config, steps + warmup, compile)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps + warmup, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, DataLoader(RandomRows(B, T), batch_size=None))
    return 1000 * sorted(timer.times)[len(timer.times) // 2]


def plain_ms_per_step(config, B, T, precision, steps, warmup, compile) -> float:
    """The same model and optimizer in a hand-written loop: what Lightning must not be slower than."""
    torch.manual_seed(0)
    module = base_module(config, steps + warmup)
    model = torch.compile(module.model) if compile else module.model
    module.model.cpu_loss_kernel = compile  # as StageModule.configure_model does
    optimizer = build_optimizer(module.model, module.optimizer_config)
    rows = iter(RandomRows(B, T))
    times = []
    for step in range(steps + warmup):
        tokens = next(rows)["tokens"]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in precision):
            loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="d4,d6")
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-plain", action="store_true", help="skip the hand-written loop baseline")
    args = parser.parse_args()

    kept = keep_freed_memory()  # as llm.train does on a CPU
    peaks = {p: measure_matmul_flops(torch.bfloat16 if "bf16" in p else torch.float32, seconds=1.0)
             for p in args.precisions.split(",")}
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, compile={args.compile}, "
          f"freed memory kept={kept}")
    for p, flops in peaks.items():
        print(f"peak matmul {p:>10}: {flops / 1e9:7.1f} GFLOP/s")
    print(f"{'shape':>5} {'precision':>10} {'loop':>9} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6}")
    for shape in args.shapes.split(","):
        depth, T, B = SHAPES[shape]
        config = GPTConfig.from_depth(depth, vocab_size=VOCAB, sequence_len=T)
        flops_per_token = GPT(config).flops_per_token()
        for precision in args.precisions.split(","):
            loops = [("lightning", lightning_ms_per_step)] + ([] if args.no_plain else [("plain", plain_ms_per_step)])
            for name, measure in loops:
                ms = measure(config, B, T, precision, args.steps, args.warmup, args.compile)
                tokens_per_s = B * T / (ms / 1000)
                mfu = tokens_per_s * flops_per_token / peaks[precision]
                print(f"{shape:>5} {precision:>10} {name:>9} {ms:9.1f} {tokens_per_s:9.0f} {100 * mfu:5.1f}%",
                      flush=True)


if __name__ == "__main__":
    main()
