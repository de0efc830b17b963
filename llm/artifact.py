"""A stage's artifact: one folder with everything needed to use or continue from the model.

    <artifacts>/<stage>/model.safetensors   weights (no pickle)
                        config.yaml         model shape, stage, tokenizer fingerprint, provenance
                        tokenizer.model     the tokenizer it was trained with
                        metrics.json        what training and evaluation measured
                        checkpoints/last.ckpt   Lightning's resumable state (written during training)

Every file is written under a temporary name and renamed into place, and config.yaml goes last, so a
folder with a config.yaml is always complete and a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import Tokenizer

@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renames it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def update_metrics(folder: str | Path, metrics: dict) -> dict:
    """Merge `metrics` into folder/metrics.json (later values win) and return the result."""
    path = Path(folder) / "metrics.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(metrics)
    write_json(path, merged)
    return merged


def save_artifact(folder: str | Path, state_dict: dict[str, torch.Tensor], config: GPTConfig,
                  tokenizer: Tokenizer, stage: str, metrics: dict, extra: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # tied weights share storage; safetensors wants each tensor once, and load re-ties them
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()
               if not (config.tie_embeddings and k == "lm_head.weight")}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    tokenizer.save(folder)
    update_metrics(folder, metrics)
    meta = {"stage": stage, "model": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(),
            **(extra or {})}
    with atomic_path(folder / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(meta, sort_keys=False))
    return folder


def resolve_artifact(source: str | Path, artifacts: str | Path) -> Path:
    """`sft` -> <artifacts>/sft (any folder name under the artifacts root); otherwise `source` is a path."""
    for folder in (Path(artifacts) / str(source), Path(source)):
        if (folder / "config.yaml").exists():
            return folder
    folder = Path(artifacts) / str(source) if "/" not in str(source) else Path(source)
    hint = (f"run `python -m llm.train stage={source}` first (or give an artifact folder)" if "/" not in str(source)
            else "give an artifact folder, or the name of one under paths.artifacts")
    raise FileNotFoundError(f"no finished artifact at {folder} (config.yaml missing): {hint}")


def read_meta(folder: str | Path) -> dict:
    return yaml.safe_load((Path(folder) / "config.yaml").read_text())


def load_artifact(folder: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config.yaml contents) of a finished artifact folder; the weights
    in `dtype` (float64 keeps a float64 run's weights exact)."""
    folder = Path(folder)
    if not (folder / "config.yaml").exists():
        raise FileNotFoundError(f"no finished artifact at {folder} (config.yaml missing)")
    meta = read_meta(folder)
    config = GPTConfig(**meta["model"])
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_weights()  # buffers (rotary tables); the weights come from the file
    state = load_file(str(folder / "model.safetensors"), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not match its config.yaml: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), Tokenizer.load(folder), meta


def check_init_compatible(folder: str | Path, config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """Refuse to continue from an artifact trained with another tokenizer or model shape."""
    meta = read_meta(folder)
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise ValueError(f"{folder} was trained with another tokenizer than {tokenizer.path}: continue with "
                         f"the tokenizer of that stage (tokenizer_dir={folder}) or retrain the earlier stages")
    saved = GPTConfig(**meta["model"])
    if asdict(saved) != asdict(config):
        diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if getattr(config, k) != v}
        raise ValueError(f"{folder} holds a model of another shape (saved vs requested: {diff}): pick the same "
                         f"model=... as the stage that wrote it")
    return meta
