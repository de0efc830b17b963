"""README.md of an exported folder: the hub's model card, with the figures of the artifact's metrics.json."""

from __future__ import annotations

import math

from llm.model.gpt import GPTConfig

FRONT_MATTER = """\
---
library_name: transformers
pipeline_tag: text-generation
tags: [nanochat, nanochat-lightning]
---
"""
TRAINING = (("parameters", "num_params"), ("steps", "steps"), ("tokens seen", "tokens"),
            ("final train loss", "train_loss"), ("wall time (s)", "wall_time_s"))


def _fmt(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _eval_rows(ev: dict) -> list[str]:
    rows = [f"| {name} | {100 * r['accuracy']:.2f}% (n={r['total']}) |"
            for section in ("core_tasks", "tasks") for name, r in (ev.get(section) or {}).items()]
    rows += [f"| {name} ({r['metric']}) | {_fmt(r['value'])} (n={r['n']}) |"
             for name, r in (ev.get("lm_eval") or {}).items()]
    rows += [f"| {label} | {_fmt(ev[k])} |" for label, k in (("CORE", "core"), ("ChatCORE", "chatcore"),
                                                            ("val bpb", "val_bpb")) if ev.get(k) is not None]
    return rows


def _architecture(config: GPTConfig) -> str:
    parts = [f"rotary (base {config.rope_theta:g})", "QK-norm", "ReLU²" if config.mlp == "relu2" else "GELU",
             f"{config.n_head} query / {config.n_kv_head} key-value heads",
             "tied embeddings" if config.tie_embeddings else "untied head",
             f"logit soft-cap {config.logit_softcap:g}" if config.logit_softcap else "no logit soft-cap"]
    return ", ".join(parts)


def model_card(config: GPTConfig, stage: str, metrics: dict, fingerprint: str) -> str:
    """The card: what the model is, how to load it, and every figure metrics.json holds."""
    lines = [FRONT_MATTER, f"# nanochat-lightning {stage} model, d{config.n_layer}", "",
             f"A {config.n_layer}-layer, {config.n_embd}-wide GPT in nanochat's architecture "
             f"({_architecture(config)}), trained with nanochat-lightning and exported to transformers' native "
             f"NanoChat (no remote code). Context: {config.sequence_len} tokens; vocabulary: "
             f"{config.vocab_size} (tokenizer fingerprint `{fingerprint[:12]}`).", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(path)", "tokenizer = AutoTokenizer.from_pretrained(path)",
             "ids = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], "
             "add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
             "out = model.generate(**ids, max_new_tokens=64)", "```", ""]
    training = [f"| stage | {stage} |"]
    training += [f"| {label} | {_fmt(metrics[k])} |" for label, k in TRAINING if metrics.get(k) is not None]
    lines += ["## Training", "", "| | |", "|---|---|", *training, ""]
    evals = _eval_rows(metrics.get("eval") or {})
    lines += ["## Evaluation", ""]
    lines += ["| task | score |", "|---|---|", *evals] if evals else ["Not evaluated (`python -m llm.eval`)."]
    return "\n".join(lines) + "\n"
