"""The report card: every stage's numbers in one markdown page, like nanochat's report.md.

Reads what the pipeline left in the artifacts folder and nothing else:

    tokenizer/compression.json      bytes per token on held-out text (python -m llm.train_tokenizer)
    <stage>/metrics.json            training numbers (python -m llm.train) and an "eval" section
                                    (python -m llm.eval); tensorboard_dir points at the loss curves

A stage that was not run (or not evaluated) shows "—", never an error; a stage whose artifact is damaged
(llm.artifact.check_artifact refuses it) shows as damaged with the one line naming the file and the fix,
and the other stages are reported as usual. The summary table is data: a Row is a label and a function
from a stage's metrics.json to a cell (None: nothing to show), so a stage adds its numbers with one line,
e.g. `ROWS.append(Row("RL reward", before_after("reward_before", "reward_after")))`. A score measured on
fewer than SMOKE_BELOW examples (offline ARC/MMLU run on the few rows shipped as fixtures) is marked
"smoke check": it shows the pipeline runs, not how good the model is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from llm.artifact import check_artifact, read_metrics
from llm.errors import BadFileError
from llm.reporting.environment import environment
from llm.reporting.plots import plot_curves, stage_curves

MISSING = "—"
SMOKE_BELOW = 50  # examples: fewer make a score a smoke check, not an accuracy
CHAT_TASK_NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "mmlu": "MMLU", "gsm8k": "GSM8K",
                   "humaneval": "HumanEval", "spelling_bee": "SpellingBee"}


def lookup(metrics: dict, path: str):
    """metrics["a"]["b"] for path "a.b"; None when any part is missing."""
    value = metrics
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def fmt_number(value, spec: str = ".4f") -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def fmt_duration(seconds) -> str | None:
    if seconds is None:
        return None
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def fmt_count(n) -> str | None:
    if n is None:
        return None
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def key(path: str, spec: str = ".4f") -> Callable[[dict], str | None]:
    """A cell showing metrics[path] (dotted) with a format spec."""
    return lambda m: fmt_number(lookup(m, path), spec)


def before_after(before: str, after: str, spec: str = ".4f") -> Callable[[dict], str | None]:
    """A cell "x → y" from two metrics (e.g. a reward before and after RL)."""
    def cell(m: dict) -> str | None:
        a, b = fmt_number(lookup(m, before), spec), fmt_number(lookup(m, after), spec)
        return None if a is None and b is None else f"{a or MISSING} → {b or MISSING}"
    return cell


def chat_accuracy(task: str) -> Callable[[dict], str | None]:
    def cell(m: dict) -> str | None:
        result = lookup(m, f"eval.tasks.{task}")
        return None if result is None else f"{100 * result['accuracy']:.2f}% ({sample_note(result['total'])})"
    return cell


def sample_note(total: int) -> str:
    return f"n={total}, smoke check" if total < SMOKE_BELOW else f"n={total}"


def aggregate(path: str, tasks: str) -> Callable[[dict], str | None]:
    """CORE / ChatCORE: the mean, marked a smoke check when any of its tasks had too few examples."""
    def cell(m: dict) -> str | None:
        value, results = fmt_number(lookup(m, path)), lookup(m, tasks) or {}
        smoke = any(r["total"] < SMOKE_BELOW for r in results.values())
        return None if value is None else value + (" (smoke check)" if smoke else "")
    return cell


def lm_eval_scores(m: dict) -> str | None:
    """One cell listing "<task> <metric> <value>" for every lm-evaluation-harness task (tasks=[lm_eval:...])."""
    records = lookup(m, "eval.lm_eval")
    if not records:
        return None
    return "<br>".join(f"{name} {r['metric']} {fmt_number(r['value']) or MISSING}" for name, r in records.items())


@dataclass(frozen=True)
class Row:
    label: str
    value: Callable[[dict], str | None]


ROWS: list[Row] = [
    Row("val bpb", lambda m: fmt_number(lookup(m, "eval.val_bpb") or lookup(m, "val_bpb"))),
    Row("CORE", aggregate("eval.core", "eval.core_tasks")),
    Row("chat loss (held-out conversations)", key("eval.chat_loss")),
    *[Row(name, chat_accuracy(task)) for task, name in CHAT_TASK_NAMES.items()],
    Row("ChatCORE", aggregate("eval.chatcore", "eval.tasks")),
    Row("lm-eval", lm_eval_scores),
    # written by the RL stage (llm.stages.rl): mean reward and GSM8K pass@1 before and after training
    Row("RL reward (before → after)", before_after("reward_before", "reward_after")),
    Row("GSM8K pass@1 (before → after)", before_after("gsm8k_pass1_before", "gsm8k_pass1_after")),
    Row("final train loss", key("train_loss")),
    Row("parameters", lambda m: fmt_count(lookup(m, "num_params"))),
    Row("steps", key("steps", "d")),
    Row("tokens seen", lambda m: fmt_count(lookup(m, "tokens"))),
    Row("wall time", lambda m: fmt_duration(lookup(m, "wall_time_s"))),
]


@dataclass
class Stage:
    name: str
    folder: Path
    present: bool  # a finished artifact (config.yaml) exists
    metrics: dict = field(default_factory=dict)
    damage: str | None = None  # why check_artifact refused it


def read_stage(artifacts: Path, name: str) -> Stage:
    folder = artifacts / name
    if not (folder / "config.yaml").exists():
        return Stage(name, folder, False)
    try:
        check_artifact(folder)
        return Stage(name, folder, True, read_metrics(folder))
    except BadFileError as err:
        return Stage(name, folder, True, damage=str(err))


def read_compression(path: Path) -> dict | None:
    """tokenizer/compression.json; None when there is none. Raises BadFileError when it does not parse."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadFileError(f"{path}: does not parse as JSON ({err}); fix: rerun `python -m llm.train_tokenizer` "
                           f"(it writes the file again)") from None


# ----------------------------------------------------------------------------- sections


def summary_table(stages: Sequence[Stage]) -> str:
    header = "| metric | " + " | ".join(s.name if s.present and not s.damage else
                                        f"{s.name} ({'damaged' if s.damage else 'missing'})" for s in stages) + " |"
    lines = [header, "|---|" + "---:|" * len(stages)]
    for row in ROWS:
        cells = [(row.value(s.metrics) if s.present else None) or MISSING for s in stages]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    total = sum(s.metrics.get("wall_time_s") or 0 for s in stages)
    lines.append(f"\nTotal training wall time: {fmt_duration(total)}")
    return "\n".join(lines)


def tokenizer_section(compression: dict | None) -> str:
    if compression is None:
        return f"{MISSING} (no tokenizer/compression.json: run `python -m llm.train_tokenizer`)"
    lines = [f"Vocabulary: {compression['vocab_size']} tokens, trained in {compression.get('train_seconds', '?')}s.",
             "", "| held-out text | bytes per token |", "|---|---:|"]
    lines += [f"| {name} | {ratio:.3f} |" for name, ratio in compression["bytes_per_token"].items()]
    return "\n".join(lines)


def tokenizer_section_of(path: Path) -> str:
    try:
        return tokenizer_section(read_compression(path))
    except BadFileError as err:
        return f"Damaged: {err}"


def results_table(results: dict) -> str:
    lines = ["| task | n | accuracy | centered |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        n = f"{r['total']} (smoke check)" if r["total"] < SMOKE_BELOW else str(r["total"])
        lines.append(f"| {name} | {n} | {100 * r['accuracy']:.2f}% | {r['centered']:.4f} |")
    return "\n".join(lines)


def lm_eval_table(records: dict) -> str:
    lines = ["| task | n | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for name, r in records.items():
        stderr = fmt_number(r["metrics"].get(f"{r['metric']}_stderr")) or MISSING
        lines.append(f"| {name} | {r['n'] if r['n'] is not None else MISSING} | {r['metric']} | "
                     f"{fmt_number(r['value']) or MISSING} | {stderr} |")
    return "\n".join(lines)


def curves_section(stage: Stage, out_dir: Path, report_dir: Path, tags: Sequence[str]) -> str:
    logs = stage.metrics.get("tensorboard_dir")
    if not logs or not Path(logs).exists():
        return f"Loss curves: {MISSING} (no TensorBoard logs{f' at {logs}' if logs else ''})"
    curves = stage_curves(logs, tags)
    if not curves:
        return f"Loss curves: {MISSING} (the logs at {logs} hold none of {list(tags)})"
    png = plot_curves(curves, out_dir / f"{stage.name}_curves.png", f"{stage.name} stage")
    return f"![{stage.name} curves]({png.relative_to(report_dir).as_posix()})"


def stage_section(stage: Stage, out_dir: Path, report_dir: Path, tags: Sequence[str]) -> str:
    if not stage.present:
        return (f"## {stage.name}\n\nMissing: no artifact at {stage.folder} "
                f"(run `python -m llm.train stage={stage.name}`).")
    if stage.damage:
        return f"## {stage.name}\n\nDamaged: {stage.damage}"
    lines = [f"## {stage.name}", ""]
    scalars = {k: v for k, v in stage.metrics.items() if isinstance(v, (int, float, str)) and k != "tensorboard_dir"}
    if scalars:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {fmt_number(v, '.4g') if isinstance(v, float) else v} |" for k, v in scalars.items()]
        lines.append("")
    ev = stage.metrics.get("eval") or {}
    if ev.get("core_tasks"):
        lines += [f"CORE {ev['core']:.4f} over {len(ev['core_tasks'])} tasks:", "", results_table(ev["core_tasks"]), ""]
    if ev.get("tasks"):
        lines += [f"ChatCORE {ev['chatcore']:.4f} over {len(ev['tasks'])} tasks:", "", results_table(ev["tasks"]), ""]
    if ev.get("lm_eval"):
        lines += ["lm-evaluation-harness:", "", lm_eval_table(ev["lm_eval"]), ""]
    if not ev:
        lines += [f"Not evaluated (run `python -m llm.eval source={stage.name}`).", ""]
    lines.append(curves_section(stage, out_dir, report_dir, tags))
    return "\n".join(lines)


def render_report(artifacts: str | Path, out: str | Path, stages: Sequence[str],
                  curve_tags: Sequence[str]) -> str:
    """The report's markdown; curve PNGs are written to <out's folder>/report/."""
    artifacts, out = Path(artifacts), Path(out)
    figures = out.parent / "report"
    read = [read_stage(artifacts, name) for name in stages]
    env = environment()
    parts = [
        "# nanochat-lightning report card",
        f"\nGenerated {datetime.now().isoformat(timespec='seconds')} from {artifacts}\n",
        "## Summary\n", summary_table(read),
        "\n## Tokenizer\n", tokenizer_section_of(artifacts / "tokenizer" / "compression.json"),
        "\n## Environment\n", "\n".join(f"- {k}: {v}" for k, v in env.items()), "",
        *[stage_section(s, figures, out.parent, curve_tags) + "\n" for s in read],
    ]
    return "\n".join(parts)


def write_report(artifacts: str | Path, out: str | Path, stages: Sequence[str],
                 curve_tags: Sequence[str]) -> Path:
    from llm.artifact import atomic_path

    text = render_report(artifacts, out, stages, curve_tags)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return Path(out)
