"""
Learning-rate and Muon-momentum schedules (nanochat's), applied straight to the param groups.

    lr multiplier:  linear warmup -> 1.0 -> linear warmdown to final_lr_frac
    Muon momentum:  warmup_start -> muon_momentum linearly over muon_momentum_warmup_steps

A stage calls `apply_schedule(optimizer, step, total_steps, ...)` once before each optimizer
step (step = number of steps already taken, i.e. Lightning's `global_step`); no LambdaLR. It
sets lr = initial_lr * multiplier on every group, so it is stateless and resume-safe: the
values depend only on `step`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class MomentumSchedule(Protocol):
    """The fields of OptimizerConfig that the momentum warmup reads."""

    muon_momentum: float
    muon_momentum_warmup_start: float
    muon_momentum_warmup_steps: int


def validate_schedule(total_steps: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}; the schedule needs at least 1 step")
    if warmup_ratio < 0 or warmdown_ratio < 0 or warmup_ratio + warmdown_ratio > 1:
        raise ValueError(
            f"warmup_ratio={warmup_ratio}, warmdown_ratio={warmdown_ratio}: each must be >= 0 and "
            "their sum <= 1 (they are fractions of total_steps)"
        )
    if not 0.0 <= final_lr_frac <= 1.0:
        raise ValueError(f"final_lr_frac={final_lr_frac}; use a fraction of the peak lr in [0, 1]")


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Multiplier on each group's initial_lr before optimizer step `step` (0-based)."""
    validate_schedule(total_steps, warmup_ratio, warmdown_ratio, final_lr_frac)
    if step < 0:
        raise ValueError(f"step={step}; steps count from 0")
    warmup_steps = round(warmup_ratio * total_steps)
    warmdown_steps = round(warmdown_ratio * total_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if warmdown_steps == 0 or step <= total_steps - warmdown_steps:
        return 1.0
    # Past total_steps (e.g. an extra step after resume) stays at the floor rather than go negative.
    progress = max(0.0, (total_steps - step) / warmdown_steps)
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, cfg: MomentumSchedule) -> float:
    """Muon momentum before step `step`: a low start avoids overshooting while grads are large."""
    if cfg.muon_momentum_warmup_steps == 0:
        return cfg.muon_momentum
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0)
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def apply_schedule(optimizer: torch.optim.Optimizer, step: int, total_steps: int, warmup_ratio: float,
                   warmdown_ratio: float, final_lr_frac: float, momentum: MomentumSchedule | None = None) -> float:
    """Set every group's lr (and, given `momentum`, Muon groups' momentum); return the multiplier."""
    multiplier = lr_multiplier(step, total_steps, warmup_ratio, warmdown_ratio, final_lr_frac)
    momentum_now = muon_momentum(step, momentum) if momentum is not None else None
    for group in optimizer.param_groups:
        if "initial_lr" not in group:
            raise ValueError(
                f"param group {group.get('name', '<unnamed>')!r} has no 'initial_lr'; "
                "build the optimizer with llm.optim.groups.build_optimizer"
            )
        group["lr"] = group["initial_lr"] * multiplier
        if momentum_now is not None and group.get("kind") == "muon":
            group["momentum"] = momentum_now
    return multiplier
