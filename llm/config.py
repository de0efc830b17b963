"""The Hydra edge: OmegaConf resolvers and the few decisions the entry modules make from a config.

Imported by every `python -m llm.*` entry point (and the tests that compose the real configs) before
a config is composed, so `${on_cpu:...}` and `${mul:...}` resolve everywhere.
"""

from __future__ import annotations

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
    for name, fn in (("on_cpu", _on_cpu), ("mul", lambda a, b: int(a) * int(b))):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


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


register_resolvers()
