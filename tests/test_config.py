"""The real conf/ tree: every group option composes, and bad overrides fail early and clearly."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config
from llm.data.corpus import corpus_files
from llm.data.sources import TextSource
from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.train import run

REPO = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


def check(cfg) -> None:
    """Resolve everything and build the typed objects the code takes."""
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    config = instantiate(cfg.model, vocab_size=cfg.model.vocab_size or 1024)
    assert isinstance(config, GPTConfig) and config.vocab_size == 1024
    assert isinstance(instantiate(cfg.optimizer, _convert_="all"), OptimizerConfig)
    source = cfg.data.get("source")
    if source is not None:
        if OmegaConf.is_missing(source, "files"):  # data=files: the user names the files
            source = OmegaConf.merge(source, {"files": [str(corpus_files()[0])]})
        assert isinstance(instantiate(source), TextSource)
    assert get_class(cfg.stage.module._target_) and get_class(cfg.data._target_)


@pytest.mark.slow
def test_every_combination_of_groups_composes():
    combos = list(itertools.product(options("stage"), options("trainer"), options("optimizer"), options("data")))
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for stage, trainer, optimizer, data in combos:
            check(compose("train", [f"stage={stage}", f"trainer={trainer}", f"optimizer={optimizer}", f"data={data}"]))
        for model in options("model"):
            check(compose("train", [f"model={model}"]))
        for experiment in options("experiment"):
            check(compose("train", [f"experiment={experiment}"]))
    assert len(combos) >= 4 * 4 * 2


def test_the_depth_dial_and_the_hardware_profile():
    cfg = compose_config("train", ["model=d26", "trainer=gpu"])
    config = instantiate(cfg.model, vocab_size=65536)
    assert (config.n_layer, config.n_embd, config.n_head, config.head_dim) == (26, 1664, 13, 128)
    assert (config.sequence_len, cfg.stage.batch.per_device, cfg.stage.batch.per_step) == (2048, 32, 524288)
    cpu = compose_config("train", ["model=d2", "trainer=ddp", "trainer.accelerator=cpu"])
    assert (cpu.model.sequence_len, cpu.stage.batch.per_device, cpu.stage.batch.per_step) == (256, 8, 4096)
    gpt2 = instantiate(compose_config("train", ["model=gpt2"]).model, vocab_size=50304)
    assert gpt2.positions == "learned" and gpt2.tie_embeddings and gpt2.mlp == "gelu"


@pytest.mark.parametrize("model", ["d4", "gpt2"])
def test_every_model_field_can_be_overridden_without_a_plus(model):
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert fields <= set(compose_config("train", [f"model={model}"]).model)  # listed, so no `+` is needed
    cfg = compose_config("train", [f"model={model}", "model.n_kv_head=1", "model.rope_theta=5000",
                                   "model.logit_softcap=30", "model.sequence_len=128"])
    config = instantiate(cfg.model, vocab_size=1024)
    assert (config.n_kv_head, config.rope_theta, config.logit_softcap, config.sequence_len) == (1, 5000, 30, 128)


def test_unknown_model_names_the_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", ["model=d3"])
    assert "model/d3" in str(err.value) and "d2" in str(err.value)


def test_heads_not_dividing_the_width_are_refused(tmp_path, tokenizer_dir):
    cfg = compose_config("train", ["model=d2", "model.n_head=3", f"tokenizer_dir={tokenizer_dir}",
                                   f"paths.artifacts={tmp_path}"])
    with pytest.raises(Exception, match=r"n_embd=128.*n_head=3"):
        run(cfg)


def test_missing_data_file_is_named(tmp_path, tokenizer_dir):
    cfg = compose_config("train", ["model=d2", "data=files", f"data.source.files=[{tmp_path}/nope.parquet]",
                                   f"tokenizer_dir={tokenizer_dir}", f"paths.artifacts={tmp_path}"])
    with pytest.raises(Exception, match=r"nope\.parquet.*does not exist.*data\.source\.files"):
        run(cfg)


def test_missing_tokenizer_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m llm.train_tokenizer"):
        run(compose_config("train", ["model=d2", f"paths.artifacts={tmp_path}"]))


@pytest.mark.slow
def test_unreachable_hub_dataset_names_the_local_file_alternative(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = compose_config("train", ["model=d2", "data=fineweb_edu", f"tokenizer_dir={tokenizer_dir}",
                                   f"paths.artifacts={tmp_path}", "trainer.max_steps=1"])
    with pytest.raises(RuntimeError, match=r"fineweb-edu.*data\.source\.kind=files"):
        run(cfg)


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run([sys.executable, "-m", "llm.train", "stage=base", "model=d20", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.depth == 20 and cfg.stage.name == "base" and cfg.optimizer.name == "muon_adamw"


def test_sweeps_can_be_submitted_to_slurm():
    # what recipes/slurm.sbatch documents: Hydra's submitit launcher composes with our configs (it submits
    # one job per sweep point; nothing here can submit, so the composed launcher is what is checked)
    out = subprocess.run([sys.executable, "-m", "llm.train", "hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2",
                          "hydra.launcher.gpus_per_node=8", "hydra.launcher.tasks_per_node=8", "--cfg", "hydra"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    launcher = OmegaConf.create(out.stdout).hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and (launcher.nodes, launcher.tasks_per_node) == (2, 8)


def test_multirun_sweep_jobs_write_separate_artifacts(tmp_path, tokenizer_dir):
    out = subprocess.run(
        [sys.executable, "-m", "llm.train", "-m", "stage=base", "model=d2", "trainer=cpu", "trainer.max_steps=2",
         "optimizer.matrix_lr=0.01,0.02", f"paths.artifacts={tmp_path}", f"tokenizer_dir={tokenizer_dir}",
         "model.sequence_len=32", "stage.batch.per_device=4", "data.num_workers=0", "stage.batch.per_step=128",
         "stage.val_batches=1", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}/multirun/sweep1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    jobs = sorted((tmp_path / "base_sweep" / "sweep1").iterdir())
    assert [j.name for j in jobs] == ["0", "1"]
    metas = [OmegaConf.load(j / "config.yaml") for j in jobs]
    assert [m.config.optimizer.matrix_lr for m in metas] == [0.01, 0.02]
    assert "optimizer.matrix_lr=0.02" in metas[1].overrides
    assert all((j / "model.safetensors").exists() for j in jobs)
    assert not (tmp_path / "base").exists()
