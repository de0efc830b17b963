"""Decode speed of the Generator on CPU: ms/token and tokens/s, with and without the KV cache.

    python bench/decode.py [--depth 4] [--prompt 256] [--new 128] [--repeats 3] [--threads N]

Model: GPTConfig.from_depth(depth, vocab_size=32768, sequence_len=1024) with random weights (speed
does not depend on what the weights say), and a 32768-token tokenizer trained on the fly (~5 s) on
4M characters of the bundled corpus.

"cache" is Generator.generate (static KV cache, one forward per token for the whole batch);
"no cache" re-runs the whole sequence through GPT.forward for every new token, as a naive loop would.
Each figure is the best of --repeats runs (the machine may be shared; the best is the least disturbed).
--precision picks the weights' precision (llm.generate.engine.for_inference): fp32, and auto = bf16-head on a
CPU with native bfloat16 (lm_head in bfloat16, the rest float32).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from llm.data.sources import TextSource, iter_texts
from llm.generate.engine import Generator
from llm.generate.prepare import PRECISIONS, for_inference
from llm.model.gpt import GPT, GPTConfig
from llm.reporting.environment import cpu_name
from llm.tokenizer import Tokenizer


CLOCK = time.perf_counter


def random_model(depth: int, vocab_size: int, sequence_len: int, max_chars: int) -> tuple[GPT, Tokenizer]:
    """A randomly weighted d<depth> GPT and a tokenizer trained on max_chars of the bundled corpus."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = Tokenizer.train(iter_texts(TextSource(), start=100), vocab_size=vocab_size, out_dir=folder,
                                    max_chars=max_chars)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.size(-1) ** -0.5)
    return model, tokenizer


def build(depth: int, precision: str = "fp32", device: str = "cpu") -> tuple[GPT, Tokenizer]:
    model, tokenizer = random_model(depth, vocab_size=32768, sequence_len=1024, max_chars=4_000_000)
    return for_inference(model.to(device), precision), tokenizer


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch * 1000 + length)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def with_cache(gen: Generator, batch: int, prompt: int, new: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one generate() call."""
    ps = prompts(batch, prompt, gen.tokenizer.vocab_size)
    t0 = CLOCK()
    steps = gen.generate(ps, max_tokens=new, temperature=1.0, seed=0)
    next(steps)  # the first step includes the prefill
    t1 = CLOCK()
    n = sum(1 for _ in steps)
    t2 = CLOCK()
    return t1 - t0, (t2 - t1) / n


@torch.inference_mode()
def without_cache(model: GPT, batch: int, prompt: int, new: int) -> float:
    """Seconds per token step when every step re-runs the whole sequence (greedy, fixed length)."""
    idx = torch.tensor(prompts(batch, prompt, model.config.vocab_size), device=model.lm_head.weight.device)
    t0 = CLOCK()
    for _ in range(new):
        nxt = model(idx)[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return (CLOCK() - t0) / new


def best(fn, repeats: int):
    return min((fn() for _ in range(repeats)), key=lambda r: r if isinstance(r, float) else r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--precision", nargs="+", default=["fp32", "auto"], choices=PRECISIONS,
                        help="weights' precision (llm.generate.engine.for_inference); each is benchmarked")
    parser.add_argument("--no-cache-new", type=int, default=16, help="tokens timed for the (slow) no-cache loop")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="rows decoding together")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, a steadier estimate on a busy machine (with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = f"{torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {threads}"
    print(f"d{args.depth}, vocab 32768, prompt {args.prompt}, {args.new} new tokens, {where}, "
          f"{args.clock} clock, best of {args.repeats}")
    for precision in args.precision:
        model, tokenizer = build(args.depth, precision, args.device)
        print(f"precision {precision} -> {model.precision}")
        bench(Generator(model, tokenizer), model, args)


def bench(gen: Generator, model: GPT, args) -> None:
    with_cache(gen, 1, 16, 4)  # warm-up (allocator, kernels)
    for batch in args.batches:
        prefill, step = best(lambda: with_cache(gen, batch, args.prompt, args.new), args.repeats)
        print(f"  batch {batch} cache    : {step * 1e3:7.2f} ms/step  {batch / step:8.1f} tokens/s"
              f"  (prefill {prefill * 1e3:.0f} ms)")
        step = best(lambda: without_cache(model, batch, args.prompt, args.no_cache_new), 1)
        print(f"  batch {batch} no cache : {step * 1e3:7.2f} ms/step  {batch / step:8.1f} tokens/s")
    # At 512 tokens of context: one new token with the cache vs re-running all 512.
    _, cached = best(lambda: with_cache(gen, 1, 512, 32), args.repeats)
    uncached = best(lambda: without_cache(model, 1, 512, 8), args.repeats)
    print(f"  context 512, batch 1: cache {cached * 1e3:.2f} ms/token, no cache {uncached * 1e3:.2f} ms/token "
          f"-> cache is {uncached / cached:.1f}x faster")


if __name__ == "__main__":
    main()
