"""CORE: the DCLM base-model benchmark, scored as nanochat's core_eval does.

Tasks come from an eval bundle in the DCLM / nanochat layout:

    <bundle>/core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [k], icl_task_type,
                                               continuation_delimiter}, ...]
    <bundle>/eval_meta_data.csv   one row per task: "Eval Task", "Random baseline" (a percentage)
    <bundle>/eval_data/<dataset_uri>   jsonl rows, by task type:
        multiple_choice    {"query", "choices": [...], "gold"}        same context, several continuations
        schema             {"context_options": [...], "continuation", "gold"}   several contexts, one continuation
        language_modeling  {"context", "continuation"}               right iff greedy decoding gives it

Each example is rendered with k few-shot examples drawn from the same task (random.Random(1234 + idx)),
tokenized after a bos, and scored by the model's loss on the continuation tokens: the option with
the lowest mean loss is the answer (MC, schema); for LM every continuation token must be the argmax.
A task's accuracy is centered on its random baseline; CORE is the mean centered accuracy.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from llm.evaluate.results import Accuracy, TaskResult
from llm.evaluate.sharding import Shard
from llm.tokenizer import Tokenizer

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # nanochat shuffles each task once, then crops it to max_per_task


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # a fraction: 0.25 for 4-way multiple choice
    rows: list[dict] = field(repr=False)

    def __post_init__(self):
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"CORE task {self.label!r} has icl_task_type {self.task_type!r}; "
                             f"supported types: {TASK_TYPES}")


def _bundle_error(folder: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no CORE eval bundle at {folder} ({what} missing). Point core.bundle=<folder> (or LLM_EVAL_BUNDLE) at "
        f"an unzipped DCLM/nanochat eval_bundle holding core.yaml, eval_meta_data.csv and eval_data/, or leave "
        f"`core` out of tasks=[...]")


def read_baselines(path: Path) -> dict[str, float]:
    """{task label: random baseline as a fraction} from eval_meta_data.csv (which gives percentages)."""
    with open(path, encoding="utf-8", newline="") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}


def load_bundle(folder: str | Path, labels: Sequence[str] | None = None) -> list[CoreTask]:
    """The bundle's tasks (all, or those named in `labels`, in the bundle's order) with their rows."""
    folder = Path(folder)
    for name in ("core.yaml", "eval_meta_data.csv", "eval_data"):
        if not (folder / name).exists():
            raise _bundle_error(folder, name)
    specs = yaml.safe_load((folder / "core.yaml").read_text(encoding="utf-8"))["icl_tasks"]
    known = [spec["label"] for spec in specs]
    unknown = sorted(set(labels or ()) - set(known))
    if unknown:
        raise ValueError(f"core.tasks names {unknown}, which {folder}/core.yaml does not have; it has {known}")
    baselines = read_baselines(folder / "eval_meta_data.csv")
    tasks = []
    for spec in specs:
        if labels is not None and spec["label"] not in labels:
            continue
        if spec["label"] not in baselines:
            raise ValueError(f"{folder}/eval_meta_data.csv has no 'Random baseline' for task {spec['label']!r}")
        fewshot = spec["num_fewshot"]
        with open(folder / "eval_data" / spec["dataset_uri"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        tasks.append(CoreTask(spec["label"], spec["icl_task_type"], int(fewshot[0] if isinstance(fewshot, list)
                              else fewshot), spec.get("continuation_delimiter", " "), baselines[spec["label"]], rows))
    return tasks


# ----------------------------------------------------------------------------- rendering
# The same strings nanochat's jinja templates produce: few-shot examples joined by blank lines.


def render_prompts(task: CoreTask, item: dict, fewshot: Sequence[dict]) -> list[str]:
    """The texts to score: one per choice (MC), per context option (schema), or [without, with] (LM)."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{d}{item['continuation']}" for context in item["context_options"]]
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
    prefix = f"{shots}{item['context'].strip()}{d}"
    # stripped so no trailing space gets merged into the continuation's first token
    return [prefix.strip(), prefix + item["continuation"]]


def _common_length(sequences: Sequence[Sequence[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) all sequences share."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        pos = -1 - i if from_end else i
        if any(s[pos] != sequences[0][pos] for s in sequences):
            return i
    return shortest


def fewshot_examples(task: CoreTask, data: Sequence[dict], idx: int) -> list[dict]:
    """k other examples of the (shuffled, cropped) task, fixed per example as in nanochat."""
    k = min(task.num_fewshot, len(data) - 1)  # a task cropped below k + 1 examples gets fewer shots
    if k <= 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(1234 + idx).sample(others, k)]


def example_sequences(task: CoreTask, data: Sequence[dict], idx: int, tokenizer: Tokenizer
                      ) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows, start, end): the scored span of row i is tokens[i][start[i]:end[i]]."""
    prompts = render_prompts(task, data[idx], fewshot_examples(task, data, idx))
    tokens = [tokenizer.encode(p, prepend_bos=True) for p in prompts]
    if task.task_type == "multiple_choice":  # shared context, different continuations
        start = _common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task.task_type == "schema":  # different contexts, shared continuation
        suffix = _common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    if with_[:len(without)] != without or len(with_) <= len(without):
        raise ValueError(f"CORE task {task.label!r}: the context's tokens are not a prefix of context + continuation "
                         f"(example {idx}); the tokenizer merged across the delimiter {task.continuation_delimiter!r}")
    return [with_], [len(without)], [len(with_)]


def _crop(tokens: list[list[int]], starts: list[int], ends: list[int], limit: int):
    """Keep the last `limit` tokens of too-long rows (the scored span sits at the end)."""
    out = ([], [], [])
    for t, s, e in zip(tokens, starts, ends):
        cut = max(0, len(t) - limit)
        for dst, value in zip(out, (t[cut:], max(1, s - cut), e - cut)):
            dst.append(value)
    return out


@torch.no_grad()
def score_example(model: nn.Module, tokenizer: Tokenizer, task: CoreTask, data: Sequence[dict], idx: int) -> bool:
    """Whether the model gets example `idx` of `data` right."""
    tokens, starts, ends = _crop(*example_sequences(task, data, idx, tokenizer), int(model.config.sequence_len))
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), tokenizer.bos_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, :len(t)] = torch.tensor(t)
    ids = ids.to(next(model.parameters()).device)
    logits = model(ids).float()
    # position p predicts token p + 1: the span [s, e) is predicted from positions [s - 1, e - 1)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(tokens), -1)
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool((logits[0, s - 1:e - 1].argmax(-1) == ids[0, s:e]).all())
    mean_losses = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return mean_losses.index(min(mean_losses)) == data[idx]["gold"]


def task_data(task: CoreTask, max_per_task: int | None = None) -> list[dict]:
    """The task's rows in nanochat's fixed shuffle, cropped to max_per_task."""
    data = list(task.rows)
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task and max_per_task > 0 else data


def evaluate_core_task(model: nn.Module, tokenizer: Tokenizer, task: CoreTask, max_per_task: int | None = None,
                       shard: Shard = Shard(), progress: bool = True) -> TaskResult:
    data = task_data(task, max_per_task)
    metric = Accuracy().to(shard.device)
    for idx in shard.progress(list(shard.items(len(data))), task.label, progress):
        metric.update([score_example(model, tokenizer, task, data, idx)])
    correct, total = metric.compute()
    return TaskResult(task.label, "core", correct, total, task.random_baseline)


def evaluate_core(model: nn.Module, tokenizer: Tokenizer, tasks: Sequence[CoreTask], max_per_task: int | None = None,
                  shard: Shard = Shard(), progress: bool = True) -> dict[str, TaskResult]:
    """{label: result} for every task; CORE is results.mean_centered of this."""
    return {t.label: evaluate_core_task(model, tokenizer, t, max_per_task, shard, progress) for t in tasks}
