"""
Tasks by name, so configs can say `tasks: [{name: gsm8k, weight: 2}, smoltalk]`.

    build_task("arc_easy", "test")                        # hub (allenai/ai2_arc, ARC-Easy)
    build_task("mmlu_aux", "train", source="fixture")     # the shipped fixture
    build_task("smoltalk", "train", data_files="smol.parquet")
    build_mixture(["smoltalk", {"name": "gsm8k", "weight": 2}], split="train", seed=0)
"""

from collections.abc import Callable, Sequence
from typing import Any

from llm.tasks.arc import ARC
from llm.tasks.arithmetic import Arithmetic
from llm.tasks.base import Task, TaskMixture
from llm.tasks.customjson import CustomJSON
from llm.tasks.gsm8k import GSM8K
from llm.tasks.humaneval import HumanEval
from llm.tasks.identity import Identity
from llm.tasks.mmlu import MMLU
from llm.tasks.smoltalk import SmolTalk
from llm.tasks.spelling import SimpleSpelling, SpellingBee

TASKS: dict[str, Callable[..., Task]] = {
    "smoltalk": SmolTalk,
    "mmlu": lambda split, **kw: MMLU("all", split, **kw),
    "mmlu_aux": lambda split, **kw: MMLU("auxiliary_train", split, **kw),
    "arc_easy": lambda split, **kw: ARC("ARC-Easy", split, **kw),
    "arc_challenge": lambda split, **kw: ARC("ARC-Challenge", split, **kw),
    "gsm8k": GSM8K,
    "identity": Identity,
    "custom_json": lambda split, **kw: CustomJSON(split=split, **kw),
    "spelling_bee": SpellingBee,
    "simple_spelling": SimpleSpelling,
    "arithmetic": Arithmetic,
    "humaneval": HumanEval,
}


def build_task(name: str, split: str = "train", **kwargs: Any) -> Task:
    """The task called `name` on `split`; kwargs go to its constructor (data_files, size, start, ...)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {sorted(TASKS)}")
    return TASKS[name](split, **kwargs)


def build_mixture(specs: Sequence[str | dict[str, Any]], split: str = "train", *, seed: int = 42,
                  size: int | None = None) -> TaskMixture:
    """
    A TaskMixture from specs: a task name, or a dict with "name" and optional "weight", "split" (overrides
    `split`) and constructor kwargs. Give weights to all specs or to none (then sizes set the proportions).
    """
    tasks, weights = [], []
    for spec in specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        if "name" not in spec:
            raise ValueError(f"a mixture spec needs a 'name', got {spec}")
        weights.append(spec.pop("weight", None))
        tasks.append(build_task(spec.pop("name"), spec.pop("split", split), **spec))
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise ValueError(f"give a weight to every task of the mixture or to none, got weights {weights}")
    return TaskMixture(tasks, weights if all(given) else None, size=size, seed=seed)
