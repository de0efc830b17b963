"""A stage's artifact: one folder with everything needed to use or continue from the model.

    <artifacts>/<stage>/model.safetensors       weights (no pickle)
                        config.yaml             model shape, stage, tokenizer fingerprint, provenance
                        tokenizer.model         the tokenizer it was trained with
                        metrics.json            what training and evaluation measured
                        checkpoints/last.ckpt   Lightning's resumable state (written during training)

Written as a whole. save_artifact writes the four artifact files into a new folder beside the old one
(`.<stage>.saving-*`), hard-links into it whatever else the old folder holds (checkpoints/, the TensorBoard
logs of a run outside Hydra), then swaps the two folders with one atomic rename (Linux renameat2
RENAME_EXCHANGE) and deletes the old one. A kill at any point leaves at <stage>/ either the old artifact or
the new one, each whole and with its checkpoints/last.ckpt: never the weights of one run beside the config
or tokenizer of another. (Where the file system cannot exchange, the swap is two renames, and a kill between
them leaves no <stage>/ but both whole folders beside it.) Between saves two files change in place, each
atomically (temp file, then rename): checkpoints/last.ckpt during training (llm.stages.checkpoint_io) and
metrics.json when llm.eval merges its results in (update_metrics).

Read through one validation. check_artifact (and load_artifact, which starts with it) turns a missing,
empty, truncated or garbage file, a config.yaml that does not parse, lacks keys, has unknown fields or
describes another shape than the weights hold, and a tokenizer.model that does not load or is not the one
the weights were trained with into a BadFileError: one line naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llm.errors import BadFileError, MissingFileError
from llm.model.gpt import GPT, GPTConfig
from llm.tokenizer import MODEL_FILENAME, Tokenizer

WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.yaml", "metrics.json"
ARTIFACT_FILES = (WEIGHTS, CONFIG, MODEL_FILENAME, METRICS)  # what a save replaces; all else is carried over
REQUIRED_META = ("stage", "model", "tokenizer_fingerprint")
OPTIONAL_META = ("init_from", "plan", "config", "overrides")  # provenance llm.train records


# ----------------------------------------------------------------------------- single files, atomically


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
    merged = {**read_metrics(folder), **metrics}
    write_json(Path(folder) / METRICS, merged)
    return merged


# ----------------------------------------------------------------------------- the folder, as a whole


def save_artifact(folder: str | Path, state_dict: dict[str, torch.Tensor], config: GPTConfig,
                  tokenizer: Tokenizer, stage: str, metrics: dict, extra: dict | None = None) -> Path:
    """Write the artifact folder anew (see the module docstring): metrics.json holds `metrics` only, since
    numbers measured on the replaced weights no longer describe the new ones."""
    folder = Path(folder).resolve() if Path(folder).is_symlink() else Path(folder)  # swap the real folder
    unknown = sorted(set(extra or {}) - set(OPTIONAL_META))
    if unknown:
        raise ValueError(f"save_artifact: config.yaml fields {unknown} are unknown to check_artifact; "
                         f"add them to llm.artifact.OPTIONAL_META")
    folder.parent.mkdir(parents=True, exist_ok=True)
    for leftover in folder.parent.glob(f".{folder.name}.saving-*"):  # of a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = folder.parent / f".{folder.name}.saving-{secrets.token_hex(6)}"
    staging.mkdir()  # not mkdtemp: its mode 0700 would become the artifact folder's
    try:
        # tied weights share storage; safetensors wants each tensor once, and load re-ties them
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()
                   if not (config.tie_embeddings and k == "lm_head.weight")}
        save_file(tensors, str(staging / WEIGHTS))
        tokenizer.save(staging)
        write_json(staging / METRICS, metrics)
        meta = {"stage": stage, "model": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(),
                **(extra or {})}
        _write_config(staging / CONFIG, meta)
        if folder.exists():
            _carry_over(folder, staging)
        _swap_in(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after the swap this is the old artifact
    return folder


def _write_config(path: Path, meta: dict) -> None:
    path.write_text(yaml.safe_dump(meta, sort_keys=False))


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (copy, where links are refused) everything of `old` that is not an artifact file into `new`."""
    for entry in old.iterdir():
        if entry.name in ARTIFACT_FILES:
            continue
        try:
            _link_or_copy(entry, new / entry.name, os.link)
        except OSError:  # a file system without hard links
            _link_or_copy(entry, new / entry.name, shutil.copy2)


def _link_or_copy(src: Path, dst: Path, copy) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=copy, dirs_exist_ok=True)
    elif not dst.exists():
        copy(src, dst, follow_symlinks=False)


def _swap_in(new: Path, folder: Path) -> None:
    """Put `new` at `folder` with one rename; an existing `folder` ends up at `new`."""
    if not folder.exists():
        os.rename(new, folder)
    elif not _exchange(new, folder):
        old = new.with_name(f"{new.name}.old")  # still a `.<stage>.saving-*` leftover if killed here
        os.rename(folder, old)
        os.rename(new, folder)
        os.rename(old, new)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux >= 3.15); False where the system or file system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), str(b))


# ----------------------------------------------------------------------------- finding and validating


def resolve_artifact(source: str | Path, artifacts: str | Path) -> Path:
    """`sft` -> <artifacts>/sft (any folder name under the artifacts root); otherwise `source` is a path."""
    for folder in (Path(artifacts) / str(source), Path(source)):
        if (folder / CONFIG).exists():
            return folder
    named = "/" not in str(source)
    folder = Path(artifacts) / str(source) if named else Path(source)
    hint = (f"run `python -m llm.train stage={source}` first (or give an artifact folder)" if named
            else "give an artifact folder, or the name of one under paths.artifacts")
    raise MissingFileError(f"no finished artifact at {folder} ({CONFIG} missing); fix: {hint}")


def _fix(folder: Path, stage: object = None) -> str:
    # the stage config.yaml names, else the folder's name (a stage's folder is named after it)
    stage = stage if isinstance(stage, str) and stage.isidentifier() else folder.name
    rerun = f"rerun `python -m llm.train stage={stage}`" if stage else "write the artifact again"
    return f"fix: {rerun} (it rewrites the whole folder), or point source= (stage.init_from= when training) at " \
           f"another artifact folder"


def _damaged(path: Path, what: str, stage: object = None) -> BadFileError:
    return BadFileError(f"{path}: {what}; {_fix(path.parent, stage)}")


def _flat(err: BaseException) -> str:
    """A library's message on one line (YAML and sentencepiece write several)."""
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_meta(folder: str | Path) -> dict:
    """config.yaml of an artifact, checked: it parses, has every key and no unknown one, and its model
    settings make a GPTConfig."""
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        raise MissingFileError(f"no finished artifact at {folder} ({CONFIG} missing); {_fix(folder)}")
    meta = _parse_yaml(path)
    stage = meta.get("stage")
    _check_keys(path, meta, REQUIRED_META, REQUIRED_META + OPTIONAL_META, "", stage)
    if not isinstance(meta["model"], dict):
        raise _damaged(path, f"model is a {type(meta['model']).__name__}, not the model's settings", stage)
    names = tuple(f.name for f in fields(GPTConfig))  # every one: a default could differ from what was trained
    _check_keys(path, meta["model"], names, names, "model ", stage)
    try:
        GPTConfig(**meta["model"])
    except (TypeError, ValueError) as err:
        raise _damaged(path, f"model settings are invalid ({_flat(err)})", stage) from None
    return meta


def _parse_yaml(path: Path) -> dict:
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _damaged(path, f"does not parse as YAML ({err.problem or err.context}{where})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise _damaged(path, f"does not parse as YAML ({_flat(err)})") from None
    if not isinstance(meta, dict):
        raise _damaged(path, f"holds a {type(meta).__name__}, not the artifact's settings")
    return meta


def _check_keys(path: Path, mapping: dict, required: tuple, allowed: tuple, prefix: str, stage) -> None:
    missing = [k for k in required if k not in mapping]
    unknown = sorted(set(map(str, mapping)) - set(allowed))
    if missing or unknown:
        problems = ([f"{prefix}lacks {missing}"] if missing else []) + \
                   ([f"{prefix}has unknown fields {unknown}"] if unknown else [])
        raise _damaged(path, ", ".join(problems), stage)


def read_metrics(folder: str | Path) -> dict:
    """metrics.json of an artifact ({} when there is none yet)."""
    path = Path(folder) / METRICS
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        metrics, problem = None, f"does not parse as JSON ({_flat(err)})"
    else:
        problem = f"holds a {type(metrics).__name__}, not an object of metrics"
    if not isinstance(metrics, dict):
        raise BadFileError(f"{path}: {problem}; fix: delete it (its numbers are lost; `python -m llm.eval "
                           f"source={path.parent}` measures again) or rerun the stage")
    return metrics


def _expected_shapes(config: GPTConfig, path: Path, stage) -> dict[str, list[int]]:
    """What model.safetensors must hold for `config`: every tensor's name and shape (built on the meta device:
    no memory, no time)."""
    try:
        with torch.device("meta"):
            model = GPT(config)
    except (TypeError, ValueError, RuntimeError) as err:
        raise _damaged(path, f"model settings do not make a model ({_flat(err)})", stage) from None
    return {k: list(v.shape) for k, v in model.state_dict().items()
            if not (config.tie_embeddings and k == "lm_head.weight")}


def _check_weights(path: Path, expected: dict[str, list[int]], stage) -> None:
    if not path.is_file():
        raise MissingFileError(f"{path}: missing; {_fix(path.parent, stage)}")
    if path.stat().st_size == 0:
        raise _damaged(path, "is empty", stage)
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise _damaged(path, f"is not a whole safetensors file, truncated or overwritten ({_flat(err)})",
                       stage) from None
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} is {shapes[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        found = "; ".join(([f"lacks {missing[:3]}"] if missing else []) +
                          ([f"has unexpected {unexpected[:3]}"] if unexpected else []) +
                          ([f"{wrong[0]} where config.yaml's model needs {expected[wrong[0].split()[0]]}"]
                           if wrong else []))
        raise _damaged(path, f"does not match the model config.yaml describes ({found})", stage)


def _load_tokenizer(folder: Path, meta: dict) -> Tokenizer:
    path, stage = folder / MODEL_FILENAME, meta["stage"]
    if not path.is_file():
        raise MissingFileError(f"{path}: missing; {_fix(folder, stage)}")
    if path.stat().st_size == 0:
        raise _damaged(path, "is empty", stage)
    try:
        tokenizer = Tokenizer.load(path)
    except Exception as err:  # sentencepiece raises RuntimeError, IndexError, ... for a file it cannot parse
        raise _damaged(path, f"is not a sentencepiece tokenizer this project trained ({_flat(err)})",
                       stage) from None
    if tokenizer.fingerprint() != meta["tokenizer_fingerprint"]:
        raise _damaged(path, f"is not the tokenizer the weights were trained with (its fingerprint differs from "
                             f"{CONFIG}'s tokenizer_fingerprint)", stage)
    if tokenizer.vocab_size != meta["model"]["vocab_size"]:
        raise _damaged(folder / CONFIG, f"model.vocab_size={meta['model']['vocab_size']} but {MODEL_FILENAME} "
                                        f"has {tokenizer.vocab_size} tokens", stage)
    return tokenizer


def _validated(folder: Path) -> tuple[dict, GPTConfig, Tokenizer]:
    meta = read_meta(folder)
    config = GPTConfig(**meta["model"])
    _check_weights(folder / WEIGHTS, _expected_shapes(config, folder / CONFIG, meta["stage"]), meta["stage"])
    tokenizer = _load_tokenizer(folder, meta)
    read_metrics(folder)
    return meta, config, tokenizer


def check_artifact(folder: str | Path) -> dict:
    """Validate every file of an artifact folder without loading the weights (the safetensors header is
    enough for names and shapes); returns config.yaml's contents. Raises BadFileError."""
    return _validated(Path(folder))[0]


def load_artifact(folder: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config.yaml contents) of a finished artifact folder; the weights
    in `dtype` (float64 keeps a float64 run's weights exact)."""
    folder = Path(folder)
    meta, config, tokenizer = _validated(folder)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_weights()  # buffers (rotary tables); the weights come from the file
    state = load_file(str(folder / WEIGHTS), device=str(device))
    model.load_state_dict(state, strict=False)  # names and shapes were checked; a tied lm_head is not stored
    return model.eval(), tokenizer, meta


def check_init_compatible(folder: str | Path, config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """Refuse to continue from a damaged artifact, or one trained with another tokenizer or model shape."""
    meta = check_artifact(folder)
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise BadFileError(f"{folder} was trained with another tokenizer than {tokenizer.path}: continue with "
                         f"the tokenizer of that stage (tokenizer_dir={folder}) or retrain the earlier stages")
    saved = GPTConfig(**meta["model"])
    if asdict(saved) != asdict(config):
        diff = {k: (v, getattr(config, k)) for k, v in asdict(saved).items() if getattr(config, k) != v}
        raise BadFileError(f"{folder} holds a model of another shape (saved vs requested: {diff}): pick the same "
                         f"model=... as the stage that wrote it")
    return meta
