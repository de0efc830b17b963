"""Shared fixtures: a tiny tokenizer trained once per session, and the real configs composed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.data.sources import TextSource, iter_texts
from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.stages.base import PretrainModule
from llm.tokenizer import Tokenizer

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(config_name: str = "train", overrides: list[str] = ()) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def optimizer_config(group: str = "muon_adamw", **overrides) -> OptimizerConfig:
    """conf/optimizer/<name>.yaml as the code gets it (its values live only there), with overrides."""
    values = OmegaConf.to_container(compose_config("train", [f"optimizer={group}"]).optimizer)
    values.pop("_target_")
    return OptimizerConfig(**{**values, **overrides})


def pretrain_module(tokenizer: Tokenizer, n_layer: int = 2, total_steps: int = 10, sequence_len: int = 64,
                    compile: bool = False) -> PretrainModule:
    """The base stage's module on a tiny model, with conf/'s optimizer and no periodic samples."""
    config = GPTConfig.from_depth(n_layer, vocab_size=tokenizer.vocab_size, sequence_len=sequence_len)
    return PretrainModule(config, optimizer_config(), tokenizer, total_steps=total_steps, warmup_ratio=0.0,
                          warmdown_ratio=0.2, final_lr_frac=0.0, sample_every=0, sample_max_tokens=1, sample_prompts=[],
                          compile=compile)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 1024-token BPE trained on the bundled corpus (first ~2 MB): fast, and real enough."""
    folder = tmp_path_factory.mktemp("artifacts") / "tokenizer"
    Tokenizer.train(iter_texts(TextSource(), start=100), vocab_size=1024, out_dir=folder, max_chars=2_000_000)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.load(tokenizer_dir)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models: on a 2-core box one thread beats two fighting over the cores,
    and it keeps forking distributed workers safe for OpenMP."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
