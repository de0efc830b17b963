"""Random-weight artifacts for the transformers export and lm-eval tests (not a test module itself)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from llm.artifact import save_artifact
from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def random_model(tokenizer: Tokenizer, depth: int = 2, seed: int = 0, **shape) -> GPT:
    """Every weight random (GPT's own init zeroes lm_head and the output projections, which would make
    the logits trivial). The stop tokens' rows of lm_head are zeroed, so greedy decoding runs its full length."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(depth, vocab_size=tokenizer.vocab_size, **shape))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / p.size(-1) ** 0.5)
        model.wte.weight.normal_(0, 1)
        if not model.config.tie_embeddings:
            for name in ("assistant_end", "bos"):
                model.lm_head.weight[tokenizer.special_id(name)] = 0
    return model.eval()


def random_artifact(folder: Path, tokenizer: Tokenizer, metrics: dict | None = None, **shape) -> Path:
    model = random_model(tokenizer, **shape)
    return save_artifact(folder, model.state_dict(), model.config, tokenizer, stage="sft", metrics=metrics or {})


def run_command(module: str, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m <module> overrides...` from the repository root; raises with its output if it fails."""
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
