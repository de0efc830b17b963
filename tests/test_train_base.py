"""The base stage end to end through `llm.train.run` and `python -m llm.train`: loss falls,
kill + resume reproduces the uninterrupted losses, DDP and FSDP match one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import compose_config
from llm.artifact import load_artifact
from llm.reporting.curves import read_scalars
from llm.train import run

REPO = Path(__file__).resolve().parents[1]


def tiny(artifacts: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """Overrides for a d2 model on 64-token rows: a step takes a fraction of a second."""
    return ["stage=base", "model=d2", "trainer=cpu", f"paths.artifacts={artifacts}", f"tokenizer_dir={tokenizer_dir}",
            "model.sequence_len=64", "stage.batch.per_device=8", "data.num_workers=0", "stage.batch.per_step=512",
            "stage.val_every=1000", "stage.val_batches=2", "stage.module.sample_every=0",
            "trainer.enable_progress_bar=false", *extra]


def cli(overrides: list[str], tmp_path: Path, timeout=300, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "llm.train", *overrides, f"hydra.run.dir={tmp_path}/hydra"]
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def finish(proc: subprocess.Popen, timeout=300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def test_loss_falls_on_the_bundled_corpus(tmp_path, tokenizer_dir, capsys):
    metrics = run(compose_config("train", tiny(tmp_path, tokenizer_dir, "trainer.max_steps=30",
                                               "stage.module.sample_every=15")))
    samples = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[step 15]")]
    assert len(samples) == 5 and "The capital of France is" in samples[0]  # greedy samples of the prompts
    losses = list(read_scalars(metrics["tensorboard_dir"], "train/loss").values())
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses
    folder = tmp_path / "base"
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["val_bpb"] > 0 and saved["steps"] == 30
    assert (folder / "model.safetensors").exists() and (folder / "checkpoints" / "last.ckpt").exists()
    model, tokenizer, meta = load_artifact(folder)
    assert meta["stage"] == "base" and model.config.vocab_size == tokenizer.vocab_size


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_losses(tmp_path, tokenizer_dir):
    steps = 12
    reference = run(compose_config("train", tiny(tmp_path / "ref", tokenizer_dir, f"trainer.max_steps={steps}")))
    expected = read_scalars(reference["tensorboard_dir"], "train/loss")

    # a real kill: SIGKILL the training process once it has written a checkpoint
    artifacts = tmp_path / "killed"
    ckpt = artifacts / "base" / "checkpoints" / "last.ckpt"
    proc = cli(tiny(artifacts, tokenizer_dir, f"trainer.max_steps={steps}", "stage.save_every=3",
                    "+trainer.max_time=null"), tmp_path, start_new_session=True)
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed: " + proc.communicate()[0][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(ckpt, weights_only=False)["global_step"]
    assert 0 < saved_step < steps
    assert not (artifacts / "base" / "config.yaml").exists()  # no finished artifact from a killed run

    resumed = run(compose_config("train", tiny(artifacts, tokenizer_dir, f"trainer.max_steps={steps}")))
    got = read_scalars(resumed["tensorboard_dir"], "train/loss")
    for step in range(saved_step, steps):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), (step, got, expected)


def final_loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return model(tokens[:, :-1], targets=tokens[:, 1:]).item()


def assert_trained_alike(folder_a: Path, folder_b: Path) -> None:
    """Two float64 runs' artifacts: the same losses and weights, far below any rounding-order effect (1e-9),
    and weights that trained (a real divergence moves them by > 1e-3)."""
    one, two = (load_artifact(folder, dtype=torch.float64)[0] for folder in (folder_a, folder_b))
    for batch_seed in range(3):
        tokens = torch.randint(0, one.config.vocab_size, (4, 65), generator=torch.Generator().manual_seed(batch_seed))
        assert final_loss(one, tokens) == pytest.approx(final_loss(two, tokens), rel=1e-9)
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        if name.endswith(("c_proj.weight", "lm_head.weight")):  # zero at init: their norm is all training
            assert a.norm() > 1e-3, f"{name} did not train"
        assert (a - b).norm() <= 1e-9 * a.norm(), name


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, tokenizer_dir, strategy):
    # one process with 2 workers and 4 accumulation steps sees the same global batches
    # as 2 ranks with 1 worker each and 2 accumulation steps (shard = rank * workers + worker).
    # In float64: the ranks sum gradients in another order than one process, and in float32 that
    # rounding (amplified by Adam's first sign-like steps) depends on the CPU's kernels; in float64
    # it stays far below the tolerances, while a real divergence moves losses and weights by > 1e-3.
    common = ["trainer.max_steps=3", "trainer.precision=64-true", "optimizer.muon_momentum_warmup_steps=0"]
    single = tiny(tmp_path / "one", tokenizer_dir, *common, "data.num_workers=2", "stage.batch.per_step=2048")
    run(compose_config("train", single))
    multi = tiny(tmp_path / strategy, tokenizer_dir, *common, "data.num_workers=1", "stage.batch.per_step=2048",
                 f"trainer={strategy}", "trainer.accelerator=cpu", "trainer.devices=2")
    finish(cli(multi, tmp_path))
    assert_trained_alike(tmp_path / "one" / "base", tmp_path / strategy / "base")
    assert json.loads((tmp_path / strategy / "base" / "metrics.json").read_text())["world_size"] == 2
