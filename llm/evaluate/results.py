"""Scores of evaluation tasks: the distributed counter behind each one, and their aggregates.

Every task's score is a count of right answers over a count of examples. The counts live in a
torchmetrics Metric whose states are summed across ranks on compute(), so any number of processes
gives exactly the one-process score (integers add up the same in any order).

Aggregates follow nanochat / DCLM: a task's *centered* accuracy rescales chance to 0 and perfect
to 1, (accuracy - chance) / (1 - chance); CORE is the mean centered accuracy of the base-model LM
tasks, ChatCORE the mean over the chat tasks (chance 0.25 for the 4-way multiple-choice tasks, 0 for
generative ones).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torchmetrics import Metric

MC_CHANCE = 0.25  # nanochat's ChatCORE treats ARC and MMLU as 4-way (a few ARC rows have 3 or 5 choices)


class Accuracy(Metric):
    """Right answers over examples seen, summed over ranks."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outcomes: list[bool] | torch.Tensor) -> None:
        outcomes = torch.as_tensor(outcomes, dtype=torch.bool).reshape(-1)
        self.correct += int(outcomes.sum())
        self.total += outcomes.numel()

    def compute(self) -> tuple[int, int]:
        """(correct, total) over every rank."""
        return int(self.correct), int(self.total)


def centered(accuracy: float, chance: float) -> float:
    """(accuracy - chance) / (1 - chance): 0 at chance, 1 when always right."""
    if not 0 <= chance < 1:
        raise ValueError(f"chance={chance!r} must lie in [0, 1)")
    return (accuracy - chance) / (1 - chance)


@dataclass(frozen=True)
class TaskResult:
    """One task's score. kind: "categorical" | "generative" | "core"."""

    task: str
    kind: str
    correct: int
    total: int
    chance: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def centered(self) -> float:
        return centered(self.accuracy, self.chance)

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "centered": self.centered}


def mean_centered(results: Mapping[str, TaskResult | dict]) -> float | None:
    """Mean centered accuracy over the results (CORE / ChatCORE); None when there are none."""
    values = [r.centered if isinstance(r, TaskResult) else r["centered"] for r in results.values()]
    return math.fsum(values) / len(values) if values else None  # fsum: the same in any task order
