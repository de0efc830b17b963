"""lm-evaluation-harness tasks in `python -m llm.eval`: tasks=[lm_eval:hellaswag,lm_eval:arc_easy,...].

The part after "lm_eval:" is any task or group lm-eval knows: its own (include_defaults), or one defined
by a task YAML in a folder of `include_path`. lm-eval runs it on our GPT through NanochatLM
(llm/evaluate/lm_eval_model.py, which says how requests are tokenized and scored), and each task's
metrics land in metrics.json's eval section under "lm_eval":

    "lm_eval": {"hellaswag": {"metric": "acc", "value": 0.31, "metrics": {"acc": ..., "acc_stderr": ...,
                              "acc_norm": ...}, "n": 10042, "num_fewshot": 0, "version": 1.0, "max_per_task": null}}

lm-eval's tasks load their data through `datasets`; offline, a task YAML pointing at local files
(dataset_path: json, dataset_kwargs.data_files) stands in for the hub (README "Use your model elsewhere").
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch.distributed as dist
import torch.nn as nn

from llm.evaluate.sharding import Shard
from llm.tokenizer import Tokenizer

PREFIX = "lm_eval:"
INSTALL_HINT = 'lm-eval tasks need the hf extra: pip install -e ".[hf]"'


@dataclass(frozen=True)
class LmEvalSettings:
    include_path: tuple[str, ...] = ()  # folders of extra task YAMLs
    include_defaults: bool = True  # lm-eval's own tasks too (indexing them takes a few seconds)
    num_fewshot: int | None = None  # None: each task's own

    def __post_init__(self):
        object.__setattr__(self, "include_path", tuple(str(p) for p in (self.include_path or ())))
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"lm_eval.num_fewshot={self.num_fewshot} must be >= 0, or null for each task's own")


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(PREFIX)


def lm_eval_task(name: str) -> str:
    """'lm_eval:hellaswag' -> 'hellaswag'."""
    task = name.removeprefix(PREFIX)
    if not task:
        raise ValueError(f"evaluation task {name!r} names no lm-eval task: write lm_eval:<task>, "
                         f"e.g. lm_eval:hellaswag")
    return task


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """lm-eval's task index, built once per process (scanning its own ~15k task YAMLs takes seconds)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def run_lm_eval(model: nn.Module, tokenizer: Tokenizer, tasks: list[str], settings: LmEvalSettings,
                batch_size: int, limit: int | None = None, shard: Shard = Shard(), progress: bool = True,
                log_samples: bool = False) -> dict | None:
    """lm-eval's own result dict for `tasks` on rank 0 (None on the other ranks)."""
    manager = task_manager(settings.include_path, settings.include_defaults)
    import lm_eval

    from llm.evaluate.lm_eval_model import NanochatLM

    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f"include_path={list(settings.include_path)}" + ("" if settings.include_defaults else
                                                               " (lm_eval.include_defaults=false)")
        raise ValueError(f"unknown lm-eval task(s) {unknown}: neither lm-eval's own tasks nor the YAMLs in {where} "
                         f"define them; add the folder of their YAML with lm_eval.include_path=[<folder>]")
    lm = NanochatLM(model, tokenizer, batch_size=batch_size, rank=shard.rank, world_size=shard.world_size,
                    progress=progress)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=settings.num_fewshot,
                                   limit=limit if limit and limit > 0 else None, task_manager=manager,
                                   log_samples=log_samples, verbosity="WARNING")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(raw: dict, max_per_task: int | None = None) -> dict[str, dict]:
    """Our record of every task and group in lm-eval's result dict (see the module docstring)."""
    records = {}
    for name, values in raw["results"].items():
        # "sample_len" is lm-eval's count of documents, kept as "n"
        metrics = {key.removesuffix(",none"): _number(v) for key, v in values.items()
                   if key not in ("alias", "sample_len")}
        metrics = {k: v for k, v in metrics.items() if v is not None and not math.isnan(v)}
        order = list(raw.get("higher_is_better", {}).get(name) or metrics)
        primary = next((m for m in order if m in metrics), next(iter(metrics), None))
        records[name] = {"metric": primary, "value": metrics.get(primary), "metrics": metrics,
                         "n": raw.get("n-samples", {}).get(name, {}).get("effective"),
                         "num_fewshot": raw.get("configs", {}).get(name, {}).get("num_fewshot"),
                         "version": raw.get("versions", {}).get(name), "max_per_task": max_per_task}
    return records


def evaluate_lm_eval(model: nn.Module, tokenizer: Tokenizer, task: str, settings: LmEvalSettings, batch_size: int,
                     max_per_task: int | None = None, shard: Shard = Shard(), progress: bool = True) -> dict[str, dict]:
    """One lm-eval task (or group) on this rank's share; the same records on every rank."""
    raw = run_lm_eval(model, tokenizer, [task], settings, batch_size, max_per_task, shard, progress)
    records = [summarize(raw, max_per_task) if shard.is_main else None]
    if shard.world_size > 1:
        dist.broadcast_object_list(records, src=0)
    return records[0]


def table_rows(records: dict[str, dict]) -> list[str]:
    """Rows of llm.evaluate.suite's results table: | task | kind | n | score | centered |."""
    rows = []
    for name, r in records.items():
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        rows.append(f"| {PREFIX}{name} | lm-eval {r['metric']} | {r['n'] if r['n'] is not None else ''} | {value} |  |")
    return rows
