"""recipes/speedrun.sh end to end: the smoke mode runs every step of the 8-GPU script on a CPU (2 gloo
processes per stage, the presets of conf/experiment/speedrun_smoke/) and leaves a full report card; the dry
run prints nanochat's d20 shape for 8 GPUs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def speedrun(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LLM_HOME": str(tmp_path / "artifacts"), "LLM_OUTPUTS": str(tmp_path / "outputs"),
           "SKIP_SETUP": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", "recipes/speedrun.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_dry_run_shows_nanochats_d20_shape_on_8_gpus(tmp_path):
    proc = speedrun(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = proc.stdout.split("stage           base")[1].split("run plan")[0]
    assert "524,288 tokens/step = 32 per device x 8 rank(s) x 1 accumulation" in base  # no accumulation
    assert "(20 tokens/parameter)" in base and "(context 2048)" in base
    assert "560,988,160 parameters" in base and "at 40% MFU of 8 x 989.4 TFLOP/s" in base
    assert "stage           rl" in proc.stdout  # GSM8K ships with the package: its plan needs no hub
    assert not (tmp_path / "artifacts").exists()  # a dry run trains nothing
    other = speedrun(tmp_path, "--dry-run", MODEL="d26", NPROC="4")  # sizes change without editing the script
    assert "x 4 rank(s) x 2 accumulation" in other.stdout.split("stage           base")[1].split("run plan")[0]


@pytest.mark.slow
def test_smoke_runs_every_step_and_fills_the_report_card(tmp_path):
    proc = speedrun(tmp_path, SMOKE="1")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("run plan") >= 4 and "x 2 rank(s)" in proc.stdout  # every stage on 2 processes
    report = (tmp_path / "artifacts" / "report.md").read_text()
    summary = report.split("## Summary")[1].split("## Tokenizer")[0]
    assert "| metric | base | mid | sft | rl |" in summary  # no stage missing
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith("| metric")}
    for row in ("chat loss (held-out conversations)", "final train loss", "steps", "tokens seen", "wall time"):
        assert "—" not in " ".join(rows[row]), (row, rows[row])  # filled for every stage
    assert rows["val bpb"][0] != "—" and rows["RL reward (before → after)"][3] != "—"
    assert all("smoke check" in cell for cell in rows["ChatCORE"][1:])  # a handful of examples, marked so
