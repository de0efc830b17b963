"""An evaluation run: named tasks in, results (and the table that shows them) out.

    "bpb"        validation bits per byte on the held-out documents     (llm.evaluate.heldout)
    "chat_loss"  masked loss on the chat stages' held-out conversations (llm.evaluate.chat_loss)
    "core"       the CORE tasks of an eval bundle                        (llm.evaluate.core)
    any categorical task of llm.tasks (arc_easy, arc_challenge, mmlu)    (llm.evaluate.categorical)
    any generative task of llm.tasks (gsm8k, humaneval, spelling_bee...) (llm.evaluate.generative)
    "lm_eval:<task>"  any lm-evaluation-harness task or group           (llm.evaluate.lm_eval_bridge)

The same code serves `python -m llm.eval` (one process per rank, under Lightning Fabric) and the
notebook (one process). Every rank calls run_suite with its Shard; the results are the same on all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from llm.data.sources import TextSource, iter_texts
from llm.evaluate.categorical import evaluate_categorical
from llm.evaluate.chat_loss import ChatLossResult, evaluate_chat_loss
from llm.evaluate.core import evaluate_core, load_bundle
from llm.evaluate.generative import BatchGenerator, evaluate_generative
from llm.evaluate.heldout import BpbResult, evaluate_bpb, heldout_rows
from llm.evaluate.lm_eval_bridge import LmEvalSettings, evaluate_lm_eval, is_lm_eval_task, lm_eval_task, table_rows
from llm.evaluate.results import TaskResult, mean_centered
from llm.evaluate.sandbox import SandboxSettings, require_sandbox
from llm.evaluate.sharding import Shard
from llm.generate.sampling import Sampling
from llm.tasks import TASKS, HubUnavailableError, build_mixture, build_task
from llm.tasks.base import Task
from llm.tokenizer import Tokenizer

SUITE_TASKS = ("bpb", "chat_loss", "core")  # the suite's own; every other name is a task of llm.tasks


@dataclass(frozen=True)
class HeldoutSettings:
    """Task "bpb": conf/eval.yaml's data (the source and its held-out first documents) and heldout."""
    source: TextSource
    val_docs: int
    max_tokens: int | None


@dataclass(frozen=True)
class CoreSettings:
    bundle: str | None  # folder of a DCLM/nanochat eval bundle
    tasks: list[str] | None  # labels to run (None: all the bundle has)


@dataclass(frozen=True)
class ChatLossSettings:
    """Task "chat_loss": conf/eval.yaml's chat_loss section (conf/data/_chat_val.yaml)."""
    val_tasks: list  # llm.tasks.build_mixture specs of the held-out conversations
    seed: int  # their order


@dataclass(frozen=True)
class SuiteSettings:
    tasks: list[str]
    max_per_task: int | None = None  # first N examples of every task (None or <= 0: all)
    batch_size: int = 8
    generation: Sampling | None = None  # generative tasks
    sandbox: SandboxSettings | None = None  # HumanEval
    heldout: HeldoutSettings | None = None  # each None: the tasks that need it cannot run
    core: CoreSettings | None = None
    chat_loss: ChatLossSettings | None = None
    task_options: dict[str, dict] = field(default_factory=dict)  # build_task kwargs per task (split, source...)
    lm_eval: LmEvalSettings = LmEvalSettings()  # lm_eval:<task> tasks

    def __post_init__(self):
        known = set(SUITE_TASKS) | set(TASKS)
        unknown = [t for t in self.tasks if t not in known and not (is_lm_eval_task(t) and lm_eval_task(t))]
        if unknown:
            raise ValueError(f"unknown evaluation tasks {unknown}; valid: {sorted(known)}, or lm_eval:<task> "
                             f"for an lm-evaluation-harness task")
        for name in self.tasks:  # refuse train-only tasks before loading their data (known for task classes)
            if name in TASKS and getattr(TASKS[name], "eval_type", "") is None:
                raise _not_evaluable(name)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")


@dataclass
class SuiteResults:
    tasks: dict[str, TaskResult] = field(default_factory=dict)  # chat tasks
    core: dict[str, TaskResult] = field(default_factory=dict)  # CORE tasks by label
    bpb: BpbResult | None = None
    chat_loss: ChatLossResult | None = None
    lm_eval: dict[str, dict] = field(default_factory=dict)  # lm-eval tasks and groups (lm_eval_bridge.summarize)

    @property
    def chatcore(self) -> float | None:
        return mean_centered(self.tasks)

    @property
    def core_metric(self) -> float | None:
        return mean_centered(self.core)

    def to_eval_section(self, max_per_task: int | None = None) -> dict:
        """This run's results in metrics.json's eval layout (llm.evaluate.record)."""
        section: dict = {}
        if self.tasks:
            section["tasks"] = {k: {**r.to_dict(), "max_per_task": max_per_task} for k, r in self.tasks.items()}
        if self.core:
            section["core_tasks"] = {k: {**r.to_dict(), "max_per_task": max_per_task} for k, r in self.core.items()}
        if self.bpb is not None:
            section.update(self.bpb.to_dict())
        if self.chat_loss is not None:
            section.update(self.chat_loss.to_dict())
        if self.lm_eval:
            section["lm_eval"] = self.lm_eval
        return section

    def table(self) -> str:
        """A markdown table of every score, with CORE / ChatCORE / val bpb rows."""
        lines = ["| task | kind | n | accuracy | centered |", "|---|---|---:|---:|---:|"]
        for r in [*self.core.values(), *self.tasks.values()]:
            lines.append(f"| {r.task} | {r.kind} | {r.total} | {_pct(r.accuracy)} | {_num(r.centered)} |")
        lines += table_rows(self.lm_eval)
        if self.core:
            lines.append(f"| **CORE** | mean of {len(self.core)} |  |  | {_num(self.core_metric)} |")
        if self.tasks:
            lines.append(f"| **ChatCORE** | mean of {len(self.tasks)} |  |  | {_num(self.chatcore)} |")
        if self.bpb is not None:
            lines.append(f"| **val bpb** | {self.bpb.tokens} tokens |  |  | {self.bpb.bpb:.4f} |")
        if self.chat_loss is not None:
            c = self.chat_loss
            lines.append(f"| **chat loss** | {c.conversations} conversations | {c.tokens} |  | {c.loss:.4f} |")
        return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.2f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4f}"


def _not_evaluable(name: str) -> ValueError:
    evaluable = sorted(n for n, t in TASKS.items() if getattr(t, "eval_type", None) is not None)
    return ValueError(f"task {name!r} cannot be evaluated (it has no right answers); evaluate tasks that do, "
                      f"e.g. {', '.join(evaluable)}")


def load_chat_task(name: str, options: dict | None = None, max_per_task: int | None = None) -> Task:
    """The task's test split (or options["split"]), cut to its first max_per_task examples.

    Hub-backed tasks (ARC, MMLU) need the hub or local files; offline the error names both options.
    """
    options = {k: v for k, v in (options or {}).items() if v is not None}
    split = options.pop("split", "test")
    try:
        task = build_task(name, split, **options)
    except HubUnavailableError as err:
        raise HubUnavailableError(
            f"evaluation task {name!r} could not load its data: {err}\nFrom `python -m llm.eval`, point it at local "
            f"files in the dataset's schema with task_options.{name}.data_files=<file.parquet|jsonl>, or use the "
            f"small fixture shipped with the package: task_options.{name}.source=fixture") from err
    if task.eval_type is None:
        raise _not_evaluable(name)
    return task[:max_per_task] if max_per_task and max_per_task > 0 else task


_SETTINGS = {"bpb": "heldout", "core": "core", "chat_loss": "chat_loss"}


def run_suite(model: nn.Module, tokenizer: Tokenizer, settings: SuiteSettings, shard: Shard = Shard(),
              generator: BatchGenerator | None = None, progress: bool = True) -> SuiteResults:
    """Evaluate every task of settings.tasks (in order) on this rank's share; same results on all ranks."""
    # every task's data first, and the sandbox where a task runs code: a run that cannot finish fails at once
    chat_tasks = {name: load_chat_task(name, settings.task_options.get(name), settings.max_per_task)
                  for name in settings.tasks if name not in SUITE_TASKS and not is_lm_eval_task(name)}
    if any(task.runs_code for task in chat_tasks.values()):
        if settings.sandbox is None:
            raise ValueError("a task runs model-written code: SuiteSettings needs sandbox settings (conf/eval.yaml)")
        require_sandbox(settings.sandbox.allow_weaker)
    results = SuiteResults()
    for name in settings.tasks:
        if name in ("bpb", "core", "chat_loss") and getattr(settings, _SETTINGS[name]) is None:
            raise ValueError(f"task {name!r} needs SuiteSettings.{_SETTINGS[name]} (conf/eval.yaml)")
        if name == "bpb":
            h = settings.heldout
            rows = heldout_rows(tokenizer, iter_texts(h.source, 0, h.val_docs), model.config.sequence_len + 1,
                                h.max_tokens)
            results.bpb = evaluate_bpb(model, tokenizer, rows, settings.batch_size, shard, progress)
        elif name == "chat_loss":
            held_out = settings.chat_loss
            conversations = build_mixture(list(held_out.val_tasks), split="test", seed=held_out.seed)
            results.chat_loss = evaluate_chat_loss(model, tokenizer, conversations, settings.batch_size, shard,
                                                   progress)
        elif name == "core":
            if not settings.core.bundle:
                raise FileNotFoundError("task 'core' needs an eval bundle: set core.bundle=<folder> "
                                        "(or LLM_EVAL_BUNDLE)")
            tasks = load_bundle(Path(settings.core.bundle), settings.core.tasks)
            results.core.update(evaluate_core(model, tokenizer, tasks, settings.max_per_task, shard, progress))
        elif is_lm_eval_task(name):
            results.lm_eval.update(evaluate_lm_eval(model, tokenizer, lm_eval_task(name), settings.lm_eval,
                                                    settings.batch_size, settings.max_per_task, shard, progress))
        elif chat_tasks[name].eval_type == "categorical":
            results.tasks[name] = evaluate_categorical(model, tokenizer, chat_tasks[name], settings.batch_size, shard,
                                                       progress)
        else:
            if generator is None:
                from llm.generate.engine import Generator
                generator = Generator(model, tokenizer)
            if settings.generation is None:
                raise ValueError(f"task {name!r} is generative: SuiteSettings needs generation settings "
                                 f"(conf/eval.yaml)")
            results.tasks[name] = evaluate_generative(generator, tokenizer, chat_tasks[name], settings.generation,
                                                      settings.sandbox, settings.batch_size, shard, progress)
    return results
