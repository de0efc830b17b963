"""Lightning checkpoints: written atomically, and checked before a run resumes from one.

A kill mid-save never leaves a corrupt last.ckpt (AtomicCheckpointIO writes a temp file, then renames).
A last.ckpt damaged some other way (truncated by a full disk or a copy, overwritten, from another model
shape or another run's settings) is refused by resumable_checkpoint with one line naming the file and the
fix: the run neither starts over silently nor goes on to overwrite the finished artifact.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from llm.artifact import atomic_path
from llm.errors import BadFileError


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path: _PATH, storage_options=None) -> None:
        with atomic_path(Path(path)) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def resumable_checkpoint(path: Path, resume: bool, module: L.LightningModule) -> str | None:
    """The checkpoint to resume `module`'s run from: `path` when resume is on and it exists, once it is known
    to be a whole Lightning checkpoint of this run (same weights' names and shapes, same hyperparameters);
    None to start fresh. Raises BadFileError.

    resume=false discards `path`: the fresh run's checkpoints then take its name (Lightning would write
    last-v1.ckpt beside it), so a later resume continues the fresh run, not the discarded one."""
    path = Path(path)
    if not resume:
        if path.is_file():
            path.unlink(missing_ok=True)  # several ranks may race to it
        return None
    if not path.exists():
        return None
    checkpoint = _read(path)
    _check_same_run(path, checkpoint, module)
    return str(path)


def _refuse(path: Path, what: str, fix: str = "") -> BadFileError:
    return BadFileError(f"{path}: {what}; fix: {fix}pass resume=false to train the stage from scratch (it "
                        f"discards this checkpoint), or delete the file")


def _read(path: Path) -> dict:
    if path.is_dir() or path.stat().st_size == 0:
        raise _refuse(path, "is empty" if path.is_file() else "is a folder, not a checkpoint file")
    # torch.save writes a zip archive; a truncated or overwritten file has no zip directory at its end
    if not zipfile.is_zipfile(path):
        raise _refuse(path, "is not a whole checkpoint (truncated, or not written by torch.save)")
    try:  # mmap: the tensors stay on disk, so the check costs no memory
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as err:  # the unpickler raises anything from EOFError to ModuleNotFoundError
        raise _refuse(path, f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:160]})") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        raise _refuse(path, "is not a Lightning checkpoint of a stage (no state_dict or hyper_parameters)")
    return checkpoint


def _check_same_run(path: Path, checkpoint: dict, module: L.LightningModule) -> None:
    saved, ours = checkpoint["state_dict"], module.state_dict()
    wrong = [k for k in ours if k not in saved or tuple(saved[k].shape) != tuple(ours[k].shape)]
    if wrong or set(saved) - set(ours):
        k = (wrong or sorted(set(saved) - set(ours)))[0]
        found = f"{tuple(saved[k].shape)}" if k in saved else "nothing"
        needed = f"{tuple(ours[k].shape)}" if k in ours else "nothing"
        raise _refuse(path, f"holds the weights of another model (for {k} it has {found}, this run needs {needed})")
    diff = _differences(dict(checkpoint["hyper_parameters"]), dict(module.hparams))
    if diff:
        raise _refuse(path, f"was written by a run with other settings ({'; '.join(diff[:3])})",
                      "resume with the settings that wrote it, ")


def _differences(saved: dict, ours: dict, prefix: str = "") -> list[str]:
    """`key: saved vs ours` for every setting that differs, nested dicts key by key."""
    out = []
    for key in sorted(set(saved) | set(ours), key=str):
        a, b = saved.get(key, "<unset>"), ours.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the checkpoint vs {b!r} in this run")
    return out
