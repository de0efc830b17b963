"""`python -m llm.report`: the report card gathers every stage's numbers; missing stages are shown, not fatal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from eval_support import REPO, make_artifact
from llm.artifact import write_json
from llm.reporting import report_card
from llm.evaluate.record import merge_eval
from llm.reporting.report_card import ROWS, Row, before_after, key, render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGES, CURVES = ["base", "mid", "sft", "rl"], ["train/loss", "val/bpb"]  # conf/report.yaml's kind of lists


def write_curves(folder, losses, val_bpb):
    writer = SummaryWriter(str(folder))
    for step, loss in enumerate(losses):
        writer.add_scalar("train/loss", loss, step)
    for step, bpb in val_bpb.items():
        writer.add_scalar("val/bpb", bpb, step)
    writer.close()


def chat_result(correct, total, chance):
    acc = correct / total
    return {"task": "", "kind": "", "correct": correct, "total": total, "chance": chance, "accuracy": acc,
            "centered": (acc - chance) / (1 - chance)}


@pytest.fixture
def pipeline(tmp_path):
    """An artifacts folder as a run that stopped after SFT leaves it: tokenizer, base, sft; no mid, no rl."""
    artifacts = tmp_path / "artifacts"
    write_json(artifacts / "tokenizer" / "compression.json",
               {"vocab_size": 512, "train_seconds": 1.5, "bytes_per_token": {"python-docs": 3.125, "wordnet": 2.5}})
    tb = tmp_path / "hydra" / "tensorboard"
    write_curves(tb, [6.0, 5.0, 4.2, 3.9], {2: 2.5, 3: 2.25})
    base_eval = merge_eval(None, {"val_bpb": 1.875, "val_bpb_tokens": 4096,
                                  "core_tasks": {"hellaswag": chat_result(30, 100, 0.25),
                                                 "copa": chat_result(60, 100, 0.5)}})
    make_artifact(artifacts, "base", metrics={
        "train_loss": 3.9, "steps": 4, "tokens": 2_097_152, "wall_time_s": 3725.0, "num_params": 1_234_567,
        "tensorboard_dir": str(tb), "eval": base_eval})
    sft_eval = merge_eval(None, {"tasks": {"arc_easy": chat_result(40, 100, 0.25), "gsm8k": chat_result(5, 50, 0.0),
                                           "arc_challenge": chat_result(3, 12, 0.25)}})  # 12 fixture rows
    make_artifact(artifacts, "sft", metrics={"train_loss": 1.25, "wall_time_s": 65.0, "tokens": 1000,
                                             "tensorboard_dir": str(tmp_path / "gone"), "eval": sft_eval})
    return artifacts


def test_report_card_holds_every_stage_and_marks_missing_ones(pipeline):
    out = write_report(pipeline, pipeline / "report.md", STAGES, CURVES)
    text = out.read_text()
    summary = text.split("## Summary")[1].split("## Tokenizer")[0]
    assert "| metric | base | mid (missing) | sft | rl (missing) |" in summary
    assert "| val bpb | 1.8750 | — | — | — |" in summary
    # CORE = mean of (0.3 - 0.25) / 0.75 and (0.6 - 0.5) / 0.5
    assert f"| CORE | {(0.05 / 0.75 + 0.2) / 2:.4f} | — | — | — |" in summary
    assert "| ARC-Easy | — | — | 40.00% (n=100) | — |" in summary
    assert "| GSM8K | — | — | 10.00% (n=50) | — |" in summary
    # 12 examples are a smoke check, not an accuracy, and so is a ChatCORE that averages them in
    assert "| ARC-Challenge | — | — | 25.00% (n=12, smoke check) | — |" in summary
    assert f"| ChatCORE | — | — | {(0.15 / 0.75 + 0.1 + 0.0) / 3:.4f} (smoke check) | — |" in summary
    assert "| arc_challenge | 12 (smoke check) | 25.00% |" in text and "| arc_easy | 100 | 40.00% |" in text
    assert "| wall time | 1h02m05s | — | 1m05s | — |" in summary
    assert "| tokens seen | 2.10M | — | 1.00K | — |" in summary
    assert "Total training wall time: 1h03m10s" in summary
    assert "| python-docs | 3.125 |" in text and "Vocabulary: 512 tokens" in text
    assert "- git commit: " in text and "- torch: " in text and "- cpu: " in text
    assert "Missing: no artifact at" in text and "python -m llm.train stage=mid" in text
    assert "| hellaswag | 100 | 30.00% | 0.0667 |" in text
    # base has TensorBoard logs: a PNG next to the report, linked relatively; sft's logs are gone: said so
    png = pipeline / "report" / "base_curves.png"
    assert "![base curves](report/base_curves.png)" in text and png.read_bytes()[:8] == PNG_MAGIC
    assert "Loss curves: — (no TensorBoard logs at" in text and not (pipeline / "report" / "sft_curves.png").exists()


def test_an_empty_artifacts_folder_still_reports(tmp_path):
    text = render_report(tmp_path, tmp_path / "report.md", STAGES, CURVES)
    assert "| metric | base (missing) | mid (missing) | sft (missing) | rl (missing) |" in text
    assert "no tokenizer/compression.json" in text


def test_a_stage_adds_a_row_with_one_line(pipeline, monkeypatch):
    monkeypatch.setattr(report_card, "ROWS", [*ROWS, Row("RL epochs", key("rl_epochs", "d"))])
    rl = json.loads((pipeline / "sft" / "metrics.json").read_text())
    make_artifact(pipeline, "rl", metrics={**rl, "rl_epochs": 7, "reward_before": 0.125, "reward_after": 0.5})
    text = render_report(pipeline, pipeline / "report.md", STAGES, CURVES)
    assert "| RL epochs | — | — | — | 7 |" in text  # a cell only where the metric exists
    assert "| RL reward (before → after) | — | — | — | 0.1250 → 0.5000 |" in text  # a built-in RL row
    assert "| GSM8K pass@1 (before → after) | — | — | — | — |" in text
    assert before_after("a", "b")({"a": 1.0}) == "1.0000 → —"


def test_cli_writes_the_report(pipeline, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llm.report", f"paths.artifacts={pipeline}",
                           f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report card: {pipeline / 'report.md'}" in proc.stdout
    assert (pipeline / "report.md").read_text().startswith("# nanochat-lightning report card")
