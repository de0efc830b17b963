"""save_artifact replaces a folder as a whole: a process killed at any point of a save leaves either the old
artifact or the new one, whole and with its checkpoints, never the files of two runs side by side."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pydoc_data.topics
import pytest
import torch

from llm import artifact
from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import Tokenizer

KILLED = 17


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs that differ in every file: weights, tokenizer, metrics (and so config.yaml)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, vocab, seed in (("old", 400, 0), ("new", 420, 1)):
        tokenizer = Tokenizer.train(pydoc_data.topics.topics.values(), vocab_size=vocab, out_dir=root / name,
                                    max_chars=60_000)
        torch.manual_seed(seed)
        model = GPT(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=64))
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        out[name] = dict(state_dict=state, config=model.config, tokenizer=tokenizer, stage="sft",
                         metrics={"run": name})
    return out


def save(folder: Path, run: dict) -> Path:
    return artifact.save_artifact(folder, **run)


def identity(folder: Path) -> dict:
    """Which run each file of the folder came from."""
    meta = artifact.check_artifact(folder)  # whole and self-consistent, or it raises
    return {"metrics": json.loads((folder / "metrics.json").read_text())["run"],
            "tokenizer": meta["tokenizer_fingerprint"], "weights": sha(folder / "model.safetensors")}


@pytest.fixture
def stage(tmp_path, runs):
    """<artifacts>/sft holding the old run's artifact, a checkpoint of the next run and its TensorBoard logs."""
    folder = save(tmp_path / "artifacts" / "sft", runs["old"])
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"the new run's checkpoint")
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events.out").write_bytes(b"the new run's curves")
    return folder


def save_killed_at(folder: Path, run: dict, k: int) -> int:
    """Fork a process that saves `run` into `folder` and dies (os._exit: no cleanup, as a SIGKILL) just
    before the k-th file operation of the save; returns its exit status (0: it finished first)."""
    pid = os.fork()
    if pid == 0:
        calls = 0

        def dying(real):
            def call(*args, **kwargs):
                nonlocal calls
                if calls == k:
                    os._exit(KILLED)
                calls += 1
                return real(*args, **kwargs)
            return call

        try:
            for name in ("save_file", "write_json", "_write_config", "_carry_over", "_exchange"):
                setattr(artifact, name, dying(getattr(artifact, name)))
            Tokenizer.save = dying(Tokenizer.save)
            artifact.shutil.rmtree = dying(shutil.rmtree)
            save(folder, run)
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError(f"the save killed at step {k} hung")


def test_a_kill_at_any_point_leaves_one_whole_artifact(stage, runs, tmp_path):
    pristine = tmp_path / "pristine"
    shutil.copytree(stage, pristine, symlinks=True)
    old = identity(stage)
    seen = []
    for k in range(20):
        status = save_killed_at(stage, runs["new"], k)
        assert status in (0, KILLED), f"the save failed at step {k} (exit status {status})"
        got = identity(stage)
        seen.append(got["metrics"])
        # never a mix: every file from the old run, or every file from the new one
        assert got == old or (got["metrics"] == "new" and got["tokenizer"] == runs["new"]["tokenizer"].fingerprint()
                              and got["weights"] != old["weights"]), (k, got)
        assert (stage / "checkpoints" / "last.ckpt").read_bytes() == b"the new run's checkpoint", k
        assert (stage / "tensorboard" / "events.out").read_bytes() == b"the new run's curves", k
        if status == 0:
            break
        for leftover in [stage, *stage.parent.glob(".sft.saving-*")]:  # the next kill starts from the old artifact
            shutil.rmtree(leftover)
        shutil.copytree(pristine, stage, symlinks=True)
    else:
        raise AssertionError("the save never finished")
    # killed before the swap: old; after it: new (and the last kills are past the swap)
    assert seen[0] == "old" and seen[-1] == "new" and seen == sorted(seen, key=["old", "new"].index)
    assert "old" in seen[:-1] and seen.count("new") >= 2, seen
    assert not list(stage.parent.glob(".sft.saving-*"))


def test_a_save_after_a_killed_one_clears_its_leftovers(stage, runs):
    assert save_killed_at(stage, runs["new"], 2) == KILLED
    assert list(stage.parent.glob(".sft.saving-*"))  # the killed save's half-written folder
    save(stage, runs["new"])
    assert identity(stage)["metrics"] == "new" and not list(stage.parent.glob(".sft.saving-*"))
    assert (stage / "checkpoints" / "last.ckpt").read_bytes() == b"the new run's checkpoint"


def test_without_an_atomic_exchange_the_save_still_replaces_the_folder(stage, runs, monkeypatch):
    monkeypatch.setattr(artifact, "_exchange", lambda a, b: False)  # a file system without RENAME_EXCHANGE
    save(stage, runs["new"])
    assert identity(stage)["metrics"] == "new" and not list(stage.parent.glob(".sft.saving-*"))
    assert (stage / "checkpoints" / "last.ckpt").read_bytes() == b"the new run's checkpoint"


def test_new_metrics_replace_the_old_ones_and_eval_merges_into_them(stage, runs):
    artifact.update_metrics(stage, {"eval": {"val_bpb": 1.0}})  # the old weights' evaluation
    save(stage, runs["new"])
    assert json.loads((stage / "metrics.json").read_text()) == {"run": "new"}  # not the old weights' numbers
    assert artifact.update_metrics(stage, {"eval": {"val_bpb": 2.0}}) == {"run": "new", "eval": {"val_bpb": 2.0}}
    probe = stage.parent / "probe"
    probe.mkdir()
    assert stage.stat().st_mode == probe.stat().st_mode  # the folder's permissions are a plain mkdir's
