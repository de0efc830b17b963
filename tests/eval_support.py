"""Tiny artifacts and rigged models for the evaluation tests (not a test module itself).

A 512-token tokenizer trained on Python's pydoc topics and a d2-sized GPT with random weights,
saved like a real stage: deterministic gibberish, which is all the plumbing tests need. Scoring
tests use `RiggedModel`, a stand-in with GPT's forward signature whose logits are crafted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pydoc_data.topics
import torch
import torch.nn as nn

from conftest import compose_config
from llm.artifact import save_artifact
from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "eval"
BUNDLE = FIXTURES / "eval_bundle"


def make_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.train(pydoc_data.topics.topics.values(), vocab_size=512, out_dir=folder, max_chars=300_000)


def make_model(tokenizer: Tokenizer, sequence_len: int = 512, seed: int = 0) -> GPT:
    """A d2 GPT with every weight random (GPT's own init zeroes lm_head, which would make all logits tie)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / p.size(-1) ** 0.5)
        model.wte.weight.normal_(0, 1)
    return model.eval()


def make_artifact(artifacts: Path, stage: str = "sft", sequence_len: int = 512, metrics: dict | None = None) -> Path:
    tokenizer = make_tokenizer(artifacts / "tokenizer")
    model = make_model(tokenizer, sequence_len)
    # the part of config.yaml the evaluator reads: the stage's default evaluation tasks (conf/stage/<stage>.yaml)
    eval_tasks = list(compose_config("train", [f"stage={stage}"]).stage.eval_tasks)
    return save_artifact(artifacts / stage, model.state_dict(), model.config, tokenizer, stage=stage,
                         metrics=metrics or {}, extra={"config": {"stage": {"name": stage, "eval_tasks": eval_tasks}}})


class RiggedModel(nn.Module):
    """GPT's forward signature, crafted logits: `prefer(row_ids) -> token id` is given a high logit at the
    last real position of every row (rows are right-padded with `pad`), all else is 0."""

    def __init__(self, vocab_size: int, prefer: Callable[[list[int]], int], pad: int, sequence_len: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, sequence_len=sequence_len)
        self.prefer, self.pad = prefer, pad
        self.dummy = nn.Parameter(torch.zeros(1))  # so next(parameters()) finds the device

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, reduction="mean"):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for i, row in enumerate(idx.tolist()):
            n = len(row)
            while n > 1 and row[n - 1] == self.pad:
                n -= 1
            logits[i, n - 1, self.prefer(row[:n])] = 10.0
        return logits


class OracleModel(nn.Module):
    """Predicts the next token of whichever registered sequence the row so far is a prefix of (a high logit
    for it), else nothing in particular (all logits 0). Registering a sequence makes the model certain of it."""

    def __init__(self, vocab_size: int, sequences: Sequence[Sequence[int]] = (), sequence_len: int = 4096):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, sequence_len=sequence_len)
        self.next: dict[tuple[int, ...], int] = {}
        self.dummy = nn.Parameter(torch.zeros(1))
        for s in sequences:
            self.register(s)

    def register(self, sequence: Sequence[int], start: int = 1) -> None:
        """Be certain of sequence[start:] once its first `start` tokens are read."""
        for t in range(max(start, 1), len(sequence)):
            self.next[tuple(sequence[:t])] = sequence[t]

    def forward(self, idx, targets=None, loss_mask=None, kv_cache=None, reduction="mean"):
        B, T = idx.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        for i, row in enumerate(idx.tolist()):
            for t in range(T):
                nxt = self.next.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[i, t, nxt] = 20.0
        return logits


class ScriptedGenerator:
    """Generator.generate_batch's signature; answers each prompt with `reply(prompt_ids) -> token ids`."""

    def __init__(self, reply: Callable[[list[int]], list[int]], context: int = 10**9):
        self.reply, self.context, self.calls = reply, context, []

    def generate_batch(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        out = []
        for p in prompts:
            for _ in range(sampling.num_samples):
                ids = self.reply(list(p))[: sampling.max_tokens]
                out.append((ids, [False] * len(ids)))
        return out
