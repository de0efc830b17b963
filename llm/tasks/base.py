"""
Task: a split of a dataset seen as a sequence of conversations, plus how to score answers.

A task loads its raw examples once (`examples(split)`), then exposes a light *view* over them:
a fixed-seed shuffle followed by a start/stop/step slice, like nanochat's tasks. Views share the
loaded rows, so `task[100:200]` or `task.shuffled(7)` cost nothing but an index array.

TaskMixture interleaves several tasks by weight, deterministically from a seed, for the
mid-training and SFT mixtures.
"""

import copy
import operator
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from llm.conversation import Conversation

if TYPE_CHECKING:  # only the type: a task that runs code imports the sandbox itself
    from llm.evaluate.sandbox import SandboxSettings

EvalType = Literal["categorical", "generative"] | None


def _check_view(start: int, stop: int | None, step: int) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if stop is not None and stop < start:
        raise ValueError(f"stop must be None or >= start ({start}), got {stop}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")


def _permutation(n: int, seed: int | None) -> np.ndarray:
    # numpy's PCG64 gives the same permutation on every platform and numpy version we support
    if seed is None:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(seed).permutation(n).astype(np.int64)


class Task:
    """
    Subclasses set `name`, `eval_type`, `splits` and implement `examples` and `to_conversation`;
    evaluation tasks implement `check`, RL-capable tasks `reward`.

    `shuffle_seed` shuffles the rows once at load (None keeps the file order), then
    `start/stop/step` slice that order; `stop` past the end is clipped.
    """

    name: str = "task"
    eval_type: EvalType = None
    runs_code: bool = False  # checking an answer runs it (in the sandbox: llm.evaluate.sandbox)
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self, split: str = "train", *, start: int = 0, stop: int | None = None, step: int = 1,
                 shuffle_seed: int | None = 42):
        if split not in self.splits:
            raise ValueError(f"{self.name} has no split {split!r}; valid splits: {self.splits}")
        self.split = split
        self._set_rows(self.examples(split), start, stop, step, shuffle_seed)

    # ---- what a subclass provides -------------------------------------------------------------

    def examples(self, split: str) -> Sequence[Any]:
        """All raw examples of `split`, in the dataset's own schema (or generated lazily)."""
        raise NotImplementedError

    def to_conversation(self, example: Any) -> Conversation:
        """One raw example as a conversation (see llm.conversation)."""
        raise NotImplementedError

    def check(self, conversation: Conversation, answer: str) -> bool:
        """Whether `answer` is right for this (reference) conversation. Evaluation tasks only."""
        raise NotImplementedError(f"task {self.name!r} does not implement check()")

    def check_samples(self, conversations: Sequence[Conversation], samples: Sequence[list[str]],
                      sandbox: "SandboxSettings | None" = None) -> list[bool]:
        """Solved or not, per conversation: right when any of its samples passes check(). The evaluator
        calls this; a task whose answers must run (runs_code) overrides it and runs them in the sandbox."""
        return [any(self.check(c, s) for s in ss) for c, ss in zip(conversations, samples)]

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward of a sampled completion. RL-capable tasks only."""
        raise NotImplementedError(
            f"task {self.name!r} has no reward(); RL-capable tasks: gsm8k, arithmetic, spelling_bee, simple_spelling"
        )

    # ---- scoring ---------------------------------------------------------------------------------

    def score(self, example_or_conversation: Any, answer: str) -> bool:
        """Score `answer` against a reference conversation or a raw example of this task."""
        if self.eval_type is None:
            raise NotImplementedError(f"task {self.name!r} is train-only (eval_type None); it cannot score answers")
        item = example_or_conversation
        conversation = item if isinstance(item, dict) and "messages" in item else self.to_conversation(item)
        return self.check(conversation, answer)

    # ---- the view --------------------------------------------------------------------------------

    def _set_rows(self, rows: Sequence[Any], start: int, stop: int | None, step: int,
                  shuffle_seed: int | None) -> None:
        _check_view(start, stop, step)
        self._rows = rows
        self._order = _permutation(len(rows), shuffle_seed)[start:stop:step]

    def __len__(self) -> int:
        return len(self._order)

    def _physical(self, index: int) -> int:
        index = operator.index(index)
        n = len(self._order)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.name} with {n} examples")
        return int(self._order[index])

    def example(self, index: int) -> Any:
        """The raw example behind `self[index]`."""
        return self._rows[self._physical(index)]

    def __getitem__(self, index: int | slice) -> "Conversation | Task":
        if isinstance(index, slice):
            view = copy.copy(self)
            view._order = self._order[index]
            return view
        conversation = self.to_conversation(self.example(index))
        # tag the source task so mixtures, per-task metrics and RL rewards can find it again
        return conversation if "task" in conversation else {**conversation, "task": self.name}

    def __iter__(self) -> Iterator[Conversation]:
        for i in range(len(self)):
            yield self[i]

    def shuffled(self, seed: int) -> "Task":
        """A view of the same rows in another fixed-seed order."""
        view = copy.copy(self)
        view._order = self._order[_permutation(len(self._order), seed)]
        return view

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)})"


class LazyExamples(Sequence):
    """A sequence of `size` examples made on access by `make(index)`: generated tasks need no storage."""

    def __init__(self, size: int, make):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.make = size, make

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.make(index)


def _counts(lengths: list[int], weights: list[float] | None, size: int | None) -> list[int]:
    """Rows each task contributes: its length (no weights) or its share of `size` (largest remainder)."""
    if weights is None:
        if size is not None:
            raise ValueError("size is only used with weights; pass weights=... or drop size")
        return list(lengths)
    if len(weights) != len(lengths):
        raise ValueError(f"got {len(weights)} weights for {len(lengths)} tasks; give one weight per task")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    size = sum(lengths) if size is None else size
    exact = [w / sum(weights) * size for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: size - sum(counts)]:
        counts[i] += 1
    return counts


class TaskMixture(Task):
    """
    Interleave tasks, shuffled with `seed`.

    Without weights every row of every task appears once (nanochat's TaskMixture: proportions follow
    the task sizes; list a task twice to see it twice). With weights, task i contributes
    weights[i] / sum(weights) of `size` rows (default: the total length), cycling through its rows
    in its own order when it has fewer.
    """

    name = "mixture"
    splits = ()

    def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None, *, size: int | None = None,
                 seed: int = 42, start: int = 0, stop: int | None = None, step: int = 1):
        if not tasks:
            raise ValueError("TaskMixture needs at least one task")
        lengths = [len(task) for task in tasks]
        for task, n in zip(tasks, lengths):
            if n == 0:
                raise ValueError(f"task {task.name!r} in the mixture is empty; drop it or widen its slice")
        self.tasks = list(tasks)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.counts = _counts(lengths, self.weights, size)
        self.split = "+".join(sorted({str(task.split) for task in tasks}))
        which = np.repeat(np.arange(len(tasks), dtype=np.int64), self.counts)
        local = np.concatenate([np.arange(c, dtype=np.int64) % n for c, n in zip(self.counts, lengths)])
        perm = _permutation(len(which), seed)
        self._set_rows(np.stack([which[perm], local[perm]], axis=1), start, stop, step, shuffle_seed=None)

    def example(self, index: int) -> tuple[int, int]:
        """(task position in `tasks`, index inside that task) behind `self[index]`."""
        task_index, local_index = self._rows[self._physical(index)]
        return int(task_index), int(local_index)

    def to_conversation(self, example: tuple[int, int]) -> Conversation:
        task_index, local_index = example
        return self.tasks[task_index][local_index]
