"""stage=mid and stage=sft through `llm.train.run`: init_from checks, masked training and validation,
one-epoch horizon, and kill + resume continuing with the same batches."""

from __future__ import annotations

import json
from pathlib import Path

import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import compose_config
from llm import artifact
from llm.reporting.curves import read_scalars
from llm.model.gpt import GPT
from llm.stages.chat import ChatModule
from llm.tokenizer import Tokenizer
from llm.train import model_config, run

SMALL = "data.tasks=[{name:arithmetic,size:20},{name:simple_spelling,size:20}]"  # 40 rows: 5 steps an epoch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(stage: str, artifacts: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """d2 on 96-token rows, 4 conversations per micro-batch, 2 micro-batches per step."""
    return [f"stage={stage}", "model=d2", "trainer=cpu", f"paths.artifacts={artifacts}",
            f"tokenizer_dir={tokenizer_dir}", "model.sequence_len=96", "stage.batch.per_device=4", "data.num_workers=0",
            "stage.batch.per_step=8", "stage.val_every=1000", "stage.val_batches=2",
            "trainer.precision=32-true", "trainer.enable_progress_bar=false", SMALL, *extra]


def save_stage(stage: str, artifacts: Path, tokenizer: Tokenizer, overrides: list[str], seed: int = 0) -> dict:
    """Write a stand-in artifact for `stage` (random weights) shaped like the run `overrides` compose."""
    config = model_config(compose_config("train", overrides), tokenizer)
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    state = model.state_dict()
    artifact.save_artifact(artifacts / stage, state, config, tokenizer, stage, {})
    return state


def test_sft_starts_from_the_mid_artifact(tmp_path, tokenizer, tokenizer_dir):
    overrides = tiny("sft", tmp_path, tokenizer_dir, "trainer.max_steps=1", *(
        f"optimizer.{lr}=0" for lr in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")))
    mid = save_stage("mid", tmp_path, tokenizer, overrides)
    metrics = run(compose_config("train", overrides))
    sft, _, meta = artifact.load_artifact(tmp_path / "sft")
    assert meta["init_from"] == "mid" and metrics["steps"] == 1
    for name, tensor in sft.state_dict().items():  # zero learning rates: the weights are mid's
        torch.testing.assert_close(tensor, mid[name], msg=name)


def test_sft_refuses_a_missing_mid(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"no finished artifact at .*mid.*python -m llm.train stage=mid"):
        run(compose_config("train", tiny("sft", tmp_path, tokenizer_dir, "trainer.max_steps=1")))
    assert not (tmp_path / "sft" / "config.yaml").exists()


def test_sft_refuses_a_mid_of_another_tokenizer(tmp_path, tokenizer_dir):
    other = Tokenizer.train(pydoc_data.topics.topics.values(), vocab_size=400, out_dir=tmp_path / "other_tok")
    overrides = tiny("sft", tmp_path, tokenizer_dir, "trainer.max_steps=1")
    save_stage("mid", tmp_path, other, tiny("sft", tmp_path, tmp_path / "other_tok"))
    with pytest.raises(ValueError, match="another tokenizer"):
        run(compose_config("train", overrides))


def test_sft_refuses_a_mid_of_another_shape(tmp_path, tokenizer, tokenizer_dir):
    save_stage("mid", tmp_path, tokenizer, tiny("sft", tmp_path, tokenizer_dir, "model=d4"))
    with pytest.raises(ValueError, match=r"another shape .*n_layer"):
        run(compose_config("train", tiny("sft", tmp_path, tokenizer_dir, "trainer.max_steps=1")))


def direct_val_loss(folder: Path, datamodule_overrides: list[str], tokenizer_dir: Path, batches: int):
    """Loss and token accuracy of the saved model on the first val batches, computed by hand."""
    cfg = compose_config("train", datamodule_overrides)
    dm = instantiate(cfg.data, tokenizer_dir=str(tokenizer_dir), batch_size=cfg.stage.batch.per_device, _convert_="all")
    model, _, _ = artifact.load_artifact(folder)
    losses, hits = [], []
    for batch, _ in zip(dm.val_batches(), range(batches)):
        with torch.no_grad():
            logits = model(batch["inputs"])
        learned = batch["targets"] != -1
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-1, reduction="none")
        losses.append(loss[learned.flatten()])
        hits.append((logits.argmax(-1) == batch["targets"])[learned])
    return torch.cat(losses).mean().item(), torch.cat(hits).float().mean().item()


def test_mid_trains_on_assistant_tokens_for_one_epoch(tmp_path, tokenizer, tokenizer_dir):
    # trainer.max_steps=-1 and stage.epochs=1: 40 conversations / (4 x 2 per step) = 5 steps
    overrides = tiny("mid", tmp_path, tokenizer_dir, "trainer.max_steps=-1", "optimizer.muon_momentum_warmup_steps=0")
    save_stage("base", tmp_path, tokenizer, overrides)
    metrics = run(compose_config("train", overrides))
    assert metrics["total_steps"] == metrics["steps"] == 5
    losses = list(read_scalars(metrics["tensorboard_dir"], "train/loss").values())
    assert losses[-1] < losses[0] - 0.5, losses
    assert read_scalars(metrics["tensorboard_dir"], "train/epoch")[4] == pytest.approx(1.0)

    saved = json.loads((tmp_path / "mid" / "metrics.json").read_text())
    loss, accuracy = direct_val_loss(tmp_path / "mid", overrides, tokenizer_dir, batches=2)
    assert saved["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert saved["val_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert 0 < saved["val_bpb"] and 0 < accuracy < 1
    assert artifact.read_meta(tmp_path / "mid")["init_from"] == "base"


def test_sft_learning_rates_are_scaled(tmp_path, tokenizer_dir):
    cfg = compose_config("train", tiny("sft", tmp_path, tokenizer_dir, "plan_only=true"))
    assert cfg.optimizer.lr_scale == 0.02 and cfg.stage.init_from == "mid" and cfg.stage.epochs == 1
    rates = run(cfg)["plan"]["learning_rates"]  # the plan shows what the optimizer groups get
    width = (128 / 768) ** -0.5  # d2
    assert rates["matrix"] == pytest.approx(0.02 * 0.02)
    assert rates["embedding"] == pytest.approx(0.2 * 0.02 * width)
    assert compose_config("train", ["stage=mid"]).optimizer.lr_scale == 1.0


TRAINING_STEP = ChatModule.training_step  # unpatched, whatever a test patches in


class Killed(Exception):
    """Stands in for the process dying (KeyboardInterrupt would make Lightning call sys.exit)."""


def record_batches(monkeypatch, crash_at: int | None = None) -> list[tuple]:
    """Patch ChatModule.training_step to note (step, cursor, inputs checksum) of every batch it trains on,
    and to die like a killed process at optimizer step `crash_at`."""
    seen: list[tuple] = []

    def step(self, batch, batch_idx):
        if crash_at is not None and self.global_step == crash_at:
            raise Killed(f"killed at step {crash_at}")
        seen.append((self.global_step, int(batch["cursor"][1]), int(batch["inputs"].sum())))
        return TRAINING_STEP(self, batch, batch_idx)

    monkeypatch.setattr(ChatModule, "training_step", step)
    return seen


def test_killed_mid_epoch_run_resumes_with_the_same_batches(tmp_path, tokenizer, tokenizer_dir, monkeypatch):
    steps = 4  # an epoch is 5 steps: the kill and the end are both mid-epoch
    for name in ("ref", "killed"):
        save_stage("base", tmp_path / name, tokenizer, tiny("mid", tmp_path / name, tokenizer_dir))
    run_overrides = lambda name: tiny("mid", tmp_path / name, tokenizer_dir, f"trainer.max_steps={steps}",  # noqa: E731
                                      "stage.save_every=2")
    reference = record_batches(monkeypatch)
    ref = run(compose_config("train", run_overrides("ref")))
    expected = read_scalars(ref["tensorboard_dir"], "train/loss")

    record_batches(monkeypatch, crash_at=3)  # the checkpoint of step 2 is on disk, step 3 never finishes
    with pytest.raises(Killed):
        run(compose_config("train", run_overrides("killed")))
    ckpt = tmp_path / "killed" / "mid" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    assert not (tmp_path / "killed" / "mid" / "config.yaml").exists()

    resumed_batches = record_batches(monkeypatch)
    resumed = run(compose_config("train", run_overrides("killed")))
    assert resumed_batches == [b for b in reference if b[0] >= 2]
    got = read_scalars(resumed["tensorboard_dir"], "train/loss")
    for step in range(2, steps):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-5), (step, got, expected)
