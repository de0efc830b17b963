"""The Hydra edge: OmegaConf resolvers and the few decisions the entry modules make from a config.

Imported by every `python -m llm.*` entry point (and the tests that compose the real configs) before
a config is composed, so `${on_cpu:...}` and `${mul:...}` resolve everywhere.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf


def runs_on_cpu(accelerator: str) -> bool:
    if accelerator == "auto":
        return not torch.cuda.is_available()
    return accelerator == "cpu"


def _on_cpu(accelerator: str, cpu_value, accelerator_value):
    """`${on_cpu:${trainer.accelerator},8,32}`: the CPU-sized value on a CPU, the other elsewhere."""
    return cpu_value if runs_on_cpu(str(accelerator)) else accelerator_value


def register_resolvers() -> None:
    for name, fn in (("on_cpu", _on_cpu), ("mul", lambda a, b: int(a) * int(b)), ("unset", _unset)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def world_size(trainer) -> int:
    """Processes a trainer config runs: devices (as Lightning reads them) x num_nodes. The run plan needs it
    before the Trainer exists; llm.train checks it against the Trainer's own count."""
    devices, nodes = trainer.devices, int(trainer.num_nodes)
    if devices in ("auto", -1, "-1"):
        local = 1 if runs_on_cpu(str(trainer.accelerator)) else max(torch.cuda.device_count(), 1)
    elif isinstance(devices, int):
        local = devices
    elif isinstance(devices, str):
        local = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    else:  # a list of device indices
        local = len(devices)
    return local * nodes


def _unset(name: str) -> bool:
    """`${unset:WANDB_API_KEY}`: True when the environment variable is not set (or empty)."""
    return not os.environ.get(name)


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto` -> bf16-mixed where the hardware computes in bf16, else 32-true."""
    if precision != "auto":
        return precision
    if runs_on_cpu(accelerator):
        has_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else:
        has_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16-mixed" if has_bf16 else "32-true"


def absolute(path: str | Path) -> Path:
    return Path(path).expanduser().absolute()


def quiet_libraries() -> None:
    """What a newcomer should not have to read: Lightning's advertisement and deprecations inside it."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith("💡 Tip"))
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


register_resolvers()
