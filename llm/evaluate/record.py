"""The "eval" section of an artifact's metrics.json: its layout, how new results merge into it.

    "eval": {
      "tasks":      {"arc_easy": {"accuracy", "centered", "correct", "total", "chance", "kind", ...}, ...},
      "chatcore":   mean centered accuracy over the chat tasks in "tasks",
      "chatcore_tasks": [...],
      "core_tasks": {"hellaswag": {...}, ...},
      "core":       mean centered accuracy over "core_tasks",
      "val_bpb", "val_bpb_tokens",
      "lm_eval":    {"hellaswag": {"metric", "value", "metrics", "n", ...}, ...}   (llm.evaluate.lm_eval_bridge)
    }

Evaluations accumulate: running `tasks=[gsm8k]` after `tasks=[arc_easy,mmlu]` keeps the ARC and MMLU
results and recomputes ChatCORE over all three. Each task keeps the settings it was measured with.
"""

from __future__ import annotations

from llm.evaluate.results import mean_centered

PER_TASK = ("tasks", "core_tasks", "lm_eval")  # sections keyed by task: a new run adds to them


def merge_eval(old: dict | None, new: dict) -> dict:
    """`old` eval section updated with `new` results (same layout); aggregates recomputed."""
    merged = dict(old or {})
    for section in PER_TASK:
        if section in new:
            merged[section] = {**merged.get(section, {}), **new[section]}
    for key, value in new.items():
        if key not in PER_TASK:
            merged[key] = value
    if merged.get("tasks"):
        merged["chatcore"] = mean_centered(merged["tasks"])
        merged["chatcore_tasks"] = sorted(merged["tasks"])
    if merged.get("core_tasks"):
        merged["core"] = mean_centered(merged["core_tasks"])
    return merged


def eval_section(metrics: dict) -> dict:
    """The eval section of a metrics.json (empty when the artifact was never evaluated)."""
    return metrics.get("eval") or {}
