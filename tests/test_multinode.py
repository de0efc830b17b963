"""Multi-node: 2 "nodes" x 1 process on 127.0.0.1, launched by torchrun as on a real cluster, train exactly as
one process on the same global batch (float64, as the DDP test: rounding order cannot move the result)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import compose_config
from llm.train import run
from test_train_base import assert_trained_alike, tiny

REPO = Path(__file__).resolve().parents[1]
COMMON = ["trainer.max_steps=3", "trainer.precision=64-true", "optimizer.muon_momentum_warmup_steps=0",
          "stage.batch.per_step=2048"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(rank: int, port: int, overrides: list[str], hydra_dir: Path) -> subprocess.Popen:
    torchrun = [shutil.which("torchrun") or "torchrun"]
    args = [*torchrun, "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1",
            f"--master-port={port}", "-m", "llm.train", *overrides, f"hydra.run.dir={hydra_dir}/node{rank}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_two_nodes_under_torchrun_match_one_process(tmp_path, tokenizer_dir):
    run(compose_config("train", tiny(tmp_path / "one", tokenizer_dir, *COMMON, "data.num_workers=2")))
    nodes = tiny(tmp_path / "nodes", tokenizer_dir, *COMMON, "data.num_workers=1", "trainer=ddp",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2")
    port = free_port()
    procs = [torchrun_node(rank, port, nodes, tmp_path / "hydra") for rank in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    metrics = json.loads((tmp_path / "nodes" / "base" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["plan"]["world_size"] == 2 and metrics["ran"]["world_size"] == 2
    assert_trained_alike(tmp_path / "one" / "base", tmp_path / "nodes" / "base")
