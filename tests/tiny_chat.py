"""A tiny chat artifact for the engine, server and web-page tests (not a test module itself).

A 400-token tokenizer trained on Python's pydoc topics and a d2-sized GPT with random weights,
saved like a real stage. Random weights make the replies gibberish, but deterministic gibberish:
greedy decoding always writes the same text, which is all the tests need. The rows of lm_head for
special tokens are zeroed and the others scaled up, so a reply rarely ends before max_tokens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydoc_data.topics
import torch

from llm.artifact import save_artifact
from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import SPECIAL_TOKENS, Tokenizer

REPO = Path(__file__).resolve().parents[1]


def make_tokenizer(folder: Path) -> Tokenizer:
    return Tokenizer.train(pydoc_data.topics.topics.values(), vocab_size=400, out_dir=folder, max_chars=200_000)


def make_model(tokenizer: Tokenizer, sequence_len: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / p.size(-1) ** 0.5 if p.dim() > 1 else 0.5)
        model.wte.weight.normal_(0, 1)
        model.lm_head.weight.normal_(0, 0.3)
        for name in SPECIAL_TOKENS:
            model.lm_head.weight[tokenizer.special_id(name)] = 0
    return model.eval()


def make_artifact(folder: Path, sequence_len: int = 256) -> Path:
    tokenizer = make_tokenizer(folder / "tokenizer")
    model = make_model(tokenizer, sequence_len)
    return save_artifact(folder / "sft", model.state_dict(), model.config, tokenizer, stage="sft", metrics={})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(source: Path, port: int, *overrides: str, log: Path, threads: int | None = 1) -> subprocess.Popen:
    """`python -m llm.serve source=... port=...` in its own process group; waits for /health.
    One torch thread by default (threads=None: the server's default): the test models are tiny."""
    env = dict(os.environ)
    if threads:
        overrides = (*overrides, f"threads={threads}")
    cmd = [sys.executable, "-m", "llm.serve", f"source={source}", f"port={port}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return proc
        except OSError:  # not listening yet, or 503 while the model loads
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"server did not become healthy in 120 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class PoisonedRow:
    """gen.model, except that batch row `row` gets nan logits at every decode step of a `width`-row batch
    (once finished rows are dropped, that index is another row's)."""

    def __init__(self, model, row, width):
        self.model, self.row, self.width = model, row, width

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, kv_cache=None):
        logits = self.model(ids, kv_cache=kv_cache)
        if ids.shape == (self.width, 1):
            logits[self.row] = float("nan")
        return logits
