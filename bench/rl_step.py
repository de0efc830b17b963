"""One RL step on CPU, timed by phase: rollouts (tokens/s), scoring, and the policy-gradient update.

    python bench/rl_step.py [--depth 4] [--prompts 8] [--samples 8] [--new 128] [--repeats 3] [--threads N]

What runs is llm.stages.rl's step without Lightning around it: sample_rollouts (the Generator, one prefill
per prompt shared by its samples, KV cache, calculator tool), score_rollouts (the arithmetic task's
reward on the answers' display text), then policy_rows + policy_gradient_loss, backward and one
MuonAdamW step. Model: GPTConfig.from_depth(depth, sequence_len=512) with random weights, so answers rarely
stop early: the rollout is close to its worst case, prompts x samples x new tokens. The tokenizer is
trained on the fly on 2 MB of the bundled corpus with 8192 tokens, the vocabulary recipes/cpu.sh uses.
Random weights never answer right, so for the update the rewards are replaced by random 0/1 ones: every
row then has a nonzero advantage and takes part in the forward and backward (the costliest case).
Each figure is the best of --repeats steps (the machine may be shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from decode import random_model  # bench/ is on the path when a script here runs
import llm.config  # noqa: F401,E402  (registers the resolvers the configs use)

from llm.generate.engine import Generator
from llm.generate.sampling import Sampling
from llm.model.gpt import GPT
from llm.optim.groups import build_optimizer
from llm.stages.rl import (group_advantages, policy_gradient_loss, policy_rows, sample_rollouts,
                           score_rollouts)
from llm.tasks import build_task
from llm.tokenizer import Tokenizer

CLOCK = time.perf_counter


def one_step(model: GPT, tokenizer: Tokenizer, optimizer, conversations, reward, settings: Sampling,
             seed: int) -> dict[str, float]:
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    model.eval()
    t0 = CLOCK()
    rollouts = sample_rollouts(Generator(model, tokenizer), prompts, replace(settings, seed=seed))
    t1 = CLOCK()
    rewards = score_rollouts(tokenizer, rollouts, conversations, reward)
    t2 = CLOCK()
    model.train()
    random_rewards = torch.randint(0, 2, rewards.shape, generator=torch.Generator().manual_seed(seed)).float()
    inputs, targets = policy_rows(rollouts, pad_id=tokenizer.bos_id)
    loss = policy_gradient_loss(model, inputs, targets, group_advantages(random_rewards).flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = CLOCK()
    return {"rollout_s": t1 - t0, "tokens": rollouts.num_tokens, "score_s": t2 - t1, "update_s": t3 - t2,
            "rows": inputs.size(0), "width": inputs.size(1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = random_model(args.depth, vocab_size=8192, sequence_len=512, max_chars=2_000_000)
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        optimizer_config = instantiate(compose("train", ["stage=rl"]).optimizer, _convert_="all")  # RL's lr_scale
    optimizer = build_optimizer(model, optimizer_config)
    task = build_task("arithmetic", "train", size=args.prompts * args.repeats)
    settings = Sampling(num_samples=args.samples, max_tokens=args.new, temperature=1.0, top_k=50)
    print(f"d{args.depth} ({model.num_params() / 1e6:.1f}M params), {args.prompts} prompts x {args.samples} samples, "
          f"{args.new} new tokens, {torch.get_num_threads()} threads, best of {args.repeats}")
    runs = []
    for r in range(args.repeats):
        conversations = [task[r * args.prompts + i] for i in range(args.prompts)]
        runs.append(one_step(model, tokenizer, optimizer, conversations, task.reward, settings, seed=r))
    best = {key: min(run[key] for run in runs) for key in ("rollout_s", "score_s", "update_s")}
    tokens = max(run["tokens"] for run in runs)
    rows, width = runs[0]["rows"], max(run["width"] for run in runs)
    print(f"rollout  {best['rollout_s']:7.2f} s   {tokens} tokens   {tokens / best['rollout_s']:8.0f} tokens/s")
    print(f"scoring  {best['score_s'] * 1e3:7.1f} ms  ({rows} answers)")
    print(f"update   {best['update_s']:7.2f} s   forward + backward + optimizer step on {rows} rows x {width} tokens")
    total = sum(best.values())
    print(f"step     {total:7.2f} s   (rollout {best['rollout_s'] / total:.0%}, update {best['update_s'] / total:.0%})")


if __name__ == "__main__":
    main()
