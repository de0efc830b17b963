"""The logger group: a d2 run logs train/loss and val/bpb where each logger keeps them (TensorBoard events,
metrics.csv, the wandb offline run file, the MLflow store), alone or several at once."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from conftest import compose_config
from llm.reporting.curves import read_scalars
from llm.train import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 3


def train(tmp_path: Path, tokenizer_dir: Path, logger: str) -> tuple[dict, Path]:
    cfg = compose_config("train", [
        "stage=base", "model=d2", "trainer=cpu", f"paths.artifacts={tmp_path}", f"tokenizer_dir={tokenizer_dir}",
        "model.sequence_len=32", "stage.batch.per_device=4", "stage.batch.per_step=128", "data.num_workers=0",
        f"trainer.max_steps={STEPS}", "stage.val_every=1", "stage.val_batches=1", "stage.module.sample_every=0",
        "trainer.enable_progress_bar=false", f"logger={logger}"])
    metrics = run(cfg)
    return metrics, tmp_path / "base"  # outside Hydra the loggers write under the stage folder


def tensorboard_values(folder: Path, tag: str) -> dict[int, float]:
    return read_scalars(folder / "tensorboard", tag)


def csv_values(folder: Path, tag: str) -> dict[int, float]:
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        return {int(row["step"]): float(row[tag]) for row in csv.DictReader(f) if row.get(tag)}


def wandb_values(folder: Path, tag: str) -> dict[int, float]:
    """History rows of the offline run file (a LevelDB-style log of protobuf records; wandb sync uploads it)."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = (folder / "wandb").rglob("offline-run-*/run-*.wandb")
    values = {}
    for data in _log_records(run_file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if tag in row:
                values[int(row["trainer/global_step"])] = float(row[tag])
    return values


def _log_records(data: bytes, header: int = 7, block: int = 32768) -> list[bytes]:
    """Records of a LevelDB log: 32 KiB blocks of chunks (crc, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    pos, records, pending = header, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending = (b"" if kind == 2 else pending) + chunk
        elif kind == 4:
            records.append(pending + chunk)
    return records


def mlflow_values(artifacts: Path, tag: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{artifacts}/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "nanochat-lightning"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "base"
    return {m.step: m.value for m in client.get_metric_history(found.info.run_id, tag)}


def assert_logged(values_of, expected: dict[str, dict[int, float]]) -> None:
    for tag in ("train/loss", "val/bpb"):
        got = values_of(tag)
        assert sorted(got) == sorted(expected[tag]), tag  # every step that logged the tag
        for step, value in expected[tag].items():
            assert got[step] == pytest.approx(value, rel=1e-6), (tag, step)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer_dir):
    """What TensorBoard (the default) records; the runs are deterministic, so every logger must see the same."""
    _, folder = train(tmp_path_factory.mktemp("tensorboard"), tokenizer_dir, "tensorboard")
    expected = {tag: tensorboard_values(folder, tag) for tag in ("train/loss", "val/bpb")}
    assert len(expected["train/loss"]) == STEPS and len(expected["val/bpb"]) >= STEPS
    return expected


def test_csv(tmp_path, tokenizer_dir, reference):
    metrics, folder = train(tmp_path, tokenizer_dir, "csv")
    assert_logged(lambda tag: csv_values(folder, tag), reference)
    assert metrics["tensorboard_dir"] is None and not (folder / "tensorboard").exists()


def test_wandb_offline_without_a_key(tmp_path, tokenizer_dir, reference, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _, folder = train(tmp_path, tokenizer_dir, "wandb")
    assert_logged(lambda tag: wandb_values(folder, tag), reference)


def test_mlflow_local_store(tmp_path, tokenizer_dir, reference):
    train(tmp_path, tokenizer_dir, "mlflow")
    assert_logged(lambda tag: mlflow_values(tmp_path, tag), reference)


def test_several_loggers_at_once(tmp_path, tokenizer_dir, reference):
    metrics, folder = train(tmp_path, tokenizer_dir, "many")
    assert_logged(lambda tag: tensorboard_values(folder, tag), reference)
    assert_logged(lambda tag: csv_values(folder, tag), reference)
    assert Path(metrics["tensorboard_dir"]) == folder / "tensorboard"  # the report card reads the curves there
