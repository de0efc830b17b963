"""Damaged artifacts and checkpoints: every command that loads one fails with one line naming the file,
what is wrong and the fix; a damaged last.ckpt neither starts over nor touches the finished artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydoc_data.topics
import pytest
import torch
import yaml

from conftest import compose_config, pretrain_module
from llm import artifact
from llm.chat import load_generator
from llm.errors import BadFileError
from llm.eval import evaluate
from llm.model.gpt import GPT, GPTConfig
from llm.reporting.report_card import render_report
from llm.serve import build_server
from llm.stages.base import PretrainModule
from llm.stages.checkpoint_io import resumable_checkpoint
from llm.tokenizer import Tokenizer
from llm.train import initial_state, model_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=d2", "model.sequence_len=64"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny(folder: Path, tokenizer: Tokenizer, stage: str, n_layer: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(n_layer, vocab_size=tokenizer.vocab_size, sequence_len=64))
    return artifact.save_artifact(folder, model.state_dict(), model.config, tokenizer, stage, {"train_loss": 1.5})


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tokenizer) -> Path:
    """<artifacts>/sft: a finished d2 artifact, copied afresh for each test that damages it."""
    return save_tiny(tmp_path_factory.mktemp("intact") / "sft", tokenizer, "sft")


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(pydoc_data.topics.topics.values(), vocab_size=400,
                           out_dir=tmp_path_factory.mktemp("other_tok"), max_chars=100_000)


def edit_config(folder: Path, change) -> None:
    meta = yaml.safe_load((folder / "config.yaml").read_text())
    change(meta)
    (folder / "config.yaml").write_text(yaml.safe_dump(meta))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


# (name, damage(folder, other_tokenizer), the file the message must name, what it must say)
DAMAGES = [
    ("weights missing", lambda f, o: (f / "model.safetensors").unlink(), "model.safetensors", "missing"),
    ("weights empty", lambda f, o: (f / "model.safetensors").write_bytes(b""), "model.safetensors", "is empty"),
    ("weights truncated", lambda f, o: truncate(f / "model.safetensors"), "model.safetensors",
     "not a whole safetensors file"),
    ("weights garbage", lambda f, o: garble(f / "model.safetensors"), "model.safetensors",
     "not a whole safetensors file"),
    ("tokenizer garbage", lambda f, o: garble(f / "tokenizer.model"), "tokenizer.model",
     "is not a sentencepiece tokenizer"),
    ("tokenizer empty", lambda f, o: (f / "tokenizer.model").write_bytes(b""), "tokenizer.model", "is empty"),
    ("tokenizer of another run", lambda f, o: o.save(f), "tokenizer.model",
     "is not the tokenizer the weights were trained with"),
    ("config does not parse", lambda f, o: (f / "config.yaml").write_text("stage: sft\nmodel: {n_layer: [2\n"),
     "config.yaml", "does not parse as YAML"),
    ("config lacks a key", lambda f, o: edit_config(f, lambda m: m.pop("tokenizer_fingerprint")),
     "config.yaml", "lacks ['tokenizer_fingerprint']"),
    ("config has an unknown field", lambda f, o: edit_config(f, lambda m: m.update(colour="red")),
     "config.yaml", "unknown fields ['colour']"),
    ("config model lacks a key", lambda f, o: edit_config(f, lambda m: m["model"].pop("n_head")),
     "config.yaml", "model lacks ['n_head']"),
    ("config of another shape", lambda f, o: edit_config(f, lambda m: m["model"].update(n_layer=4)),
     "model.safetensors", "does not match the model config.yaml describes"),
    ("metrics do not parse", lambda f, o: (f / "metrics.json").write_text('{"train_loss": 1.'),
     "metrics.json", "does not parse as JSON"),
]


def damaged_copy(intact: Path, tmp_path: Path, damage, other_tokenizer) -> Path:
    artifacts = tmp_path / "artifacts"
    shutil.copytree(intact, artifacts / "sft")
    damage(artifacts / "sft", other_tokenizer)
    return artifacts


REPORT = (["base", "mid", "sft", "rl"], ["train/loss"])  # stages and curves, as conf/report.yaml lists them

def chat(artifacts: Path, tokenizer_dir: Path):
    load_generator(compose_config("chat", [f"paths.artifacts={artifacts}", "source=sft", "device=cpu"]))


def evaluate_it(artifacts: Path, tokenizer_dir: Path):
    evaluate(compose_config("eval", [f"paths.artifacts={artifacts}", "source=sft", "trainer.precision=32-true",
                                     "tasks=[arc_easy]", "progress=false"]))


def serve(artifacts: Path, tokenizer_dir: Path):
    build_server(compose_config("serve", [f"paths.artifacts={artifacts}", "source=sft", "device=cpu"]))


def export_it(artifacts: Path, tokenizer_dir: Path):
    from llm.huggingface.folder import export_folder

    export_folder(artifacts / "sft", artifacts.parent / "exported", overwrite=True)


def init_from(artifacts: Path, tokenizer_dir: Path):
    cfg = compose_config("train", ["stage=rl", *TINY, f"paths.artifacts={artifacts}", f"tokenizer_dir={tokenizer_dir}"])
    tokenizer = Tokenizer.load(tokenizer_dir)
    initial_state(cfg, model_config(cfg, tokenizer), tokenizer)


def report(artifacts: Path, tokenizer_dir: Path):
    """The report does not fail: it shows the stage as damaged, with the line (raised here to compare)."""
    text = render_report(artifacts, artifacts / "report.md", *REPORT)
    assert "sft (damaged)" in text.split("## Tokenizer")[0]
    line = text.split("## sft\n\nDamaged: ")[1].split("\n")[0]
    raise BadFileError(line)


@pytest.mark.parametrize("command", [chat, evaluate_it, serve, export_it, init_from, report], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name,damage,file,what", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_each_command_names_the_damaged_file_and_the_fix(command, name, damage, file, what, intact, tmp_path,
                                                         tokenizer_dir, other_tokenizer):
    artifacts = damaged_copy(intact, tmp_path, damage, other_tokenizer)
    with pytest.raises(BadFileError) as caught:
        command(artifacts, tokenizer_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{artifacts / 'sft' / file}: " in message and what in message, message
    if file == "metrics.json":
        assert "fix: delete it" in message and "python -m llm.eval" in message
    else:
        assert "fix: rerun `python -m llm.train stage=sft`" in message and "point source=" in message


def test_an_intact_artifact_passes_every_check(intact, tmp_path, tokenizer_dir):
    artifacts = damaged_copy(intact, tmp_path, lambda f, o: None, None)
    meta = artifact.check_artifact(artifacts / "sft")
    assert meta["stage"] == "sft"
    chat(artifacts, tokenizer_dir)
    serve(artifacts, tokenizer_dir)
    init_from(artifacts, tokenizer_dir)
    assert "| metric | base (missing) | mid (missing) | sft | rl (missing) |" in render_report(artifacts, tmp_path / "r.md", *REPORT)


def test_a_damaged_stage_leaves_the_rest_of_the_report_useful(intact, tmp_path, tokenizer, tokenizer_dir):
    artifacts = damaged_copy(intact, tmp_path, lambda f, o: truncate(f / "model.safetensors"), None)
    save_tiny(artifacts / "base", tokenizer, "base")
    (artifacts / "tokenizer").mkdir()
    (artifacts / "tokenizer" / "compression.json").write_text("{")
    text = render_report(artifacts, artifacts / "report.md", *REPORT)
    assert "| metric | base | mid (missing) | sft (damaged) | rl (missing) |" in text
    assert "| final train loss | 1.5000 | — | — | — |" in text  # base's numbers are there
    assert "compression.json: does not parse as JSON" in text and "python -m llm.train_tokenizer" in text


def test_chat_prints_one_line_and_no_traceback(intact, tmp_path):
    artifacts = damaged_copy(intact, tmp_path, lambda f, o: truncate(f / "model.safetensors"), None)
    proc = subprocess.run([sys.executable, "-m", "llm.chat", f"source={artifacts / 'sft'}", "prompt=hi", "device=cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {artifacts / 'sft' / 'model.safetensors'}: is not a whole safetensors file")
    assert line.endswith("; fix: rerun `python -m llm.train stage=sft` (it rewrites the whole folder), or point "
                         "source= (stage.init_from= when training) at another artifact folder")


# ----------------------------------------------------------------------------- resume from last.ckpt


def lightning_checkpoint(path: Path, module: PretrainModule) -> Path:
    """What Lightning saves, as far as resuming looks at it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 3,
                "epoch": 0, "loops": {}}, path)
    return path


CHECKPOINT_DAMAGES = [
    ("empty", lambda p, t: p.write_bytes(b""), "is empty"),
    ("truncated", lambda p, t: truncate(p), "is not a whole checkpoint"),
    ("garbage", lambda p, t: garble(p), "is not a whole checkpoint"),
    ("not a Lightning checkpoint", lambda p, t: torch.save({"weights": torch.zeros(3)}, p),
     "is not a Lightning checkpoint"),
    ("another model shape", lambda p, t: lightning_checkpoint(p, pretrain_module(t, n_layer=4)),
     "holds the weights of another model"),
    ("another run", lambda p, t: lightning_checkpoint(p, pretrain_module(t, total_steps=20)),
     "was written by a run with other settings (total_steps: 20 in the checkpoint vs 10 in this run)"),
]


@pytest.mark.parametrize("name,damage,what", CHECKPOINT_DAMAGES, ids=[d[0] for d in CHECKPOINT_DAMAGES])
def test_resume_refuses_a_damaged_checkpoint(name, damage, what, tmp_path, tokenizer):
    module = pretrain_module(tokenizer)
    ckpt = lightning_checkpoint(tmp_path / "checkpoints" / "last.ckpt", module)
    assert resumable_checkpoint(ckpt, True, module) == str(ckpt)  # intact: resumed
    damage(ckpt, tokenizer)
    with pytest.raises(BadFileError) as caught:
        resumable_checkpoint(ckpt, True, module)
    message = str(caught.value)
    assert message.startswith(f"{ckpt}: ") and what in message and "\n" not in message, message
    assert "fix: " in message and "resume=false" in message and "delete the file" in message
    assert resumable_checkpoint(ckpt, False, module) is None and not ckpt.exists()  # resume=false discards it


def test_train_with_a_damaged_checkpoint_fails_and_keeps_the_artifact(tmp_path, tokenizer, tokenizer_dir):
    """The real command: `python -m llm.train` stops with the line; the finished artifact is untouched."""
    artifacts = tmp_path / "artifacts"
    folder = save_tiny(artifacts / "base", tokenizer, "base")
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 half of a zip")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
    overrides = ["stage=base", *TINY, "trainer=cpu", f"paths.artifacts={artifacts}", f"tokenizer_dir={tokenizer_dir}",
                 "stage.batch.per_device=2", "data.num_workers=0", "stage.batch.per_step=128", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run([sys.executable, "-m", "llm.train", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {ckpt}: is not a whole checkpoint (truncated, or not written by torch.save); fix: pass resume=false "
        f"to train the stage from scratch (it discards this checkpoint), or delete the file")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}
    assert after == before and ckpt.read_bytes() == b"PK\x03\x04 half of a zip"
    assert json.loads((folder / "metrics.json").read_text()) == {"train_loss": 1.5}
