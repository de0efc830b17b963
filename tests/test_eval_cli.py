"""`python -m llm.eval`: one process vs two (DDP over gloo), metrics.json merging, offline errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pydoc_data.topics
import pytest

from conftest import compose_config
from eval_support import BUNDLE, REPO, make_artifact
from llm.eval import evaluate
from llm.tasks import HubUnavailableError


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    make_artifact(folder, "sft", sequence_len=128, metrics={"train_loss": 3.5, "wall_time_s": 12.0})
    # held-out text for val bpb: a few documents of a local jsonl file (quicker to open than the bundled corpus)
    docs = [{"text": topic} for topic in list(pydoc_data.topics.topics.values())[:20]]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder


def overrides(artifacts, *extra: str) -> list[str]:
    return [f"paths.artifacts={artifacts}", "source=sft", "trainer.precision=32-true", "progress=false",
            f"core.bundle={BUNDLE}", "task_options.arc_easy.source=fixture", "task_options.mmlu.source=fixture",
            "data=files", f"data.source.files=[{artifacts}/heldout.jsonl]", "data.val_docs=20",
            "generation.max_tokens=8", "heldout.max_tokens=1536", "sandbox.timeout_s=3",
            "chat_loss.val_tasks=[{name:identity,split:train,stop:5}]", *extra]


def eval_section(artifacts) -> dict:
    return json.loads((artifacts / "sft" / "metrics.json").read_text())["eval"]


@pytest.mark.slow
def test_two_processes_give_exactly_the_one_process_scores(artifacts, tmp_path):
    # batch_size=1 and 3 examples per task: the two ranks get uneven shares (2 and 1)
    common = overrides(artifacts, "tasks=[bpb,chat_loss,core,arc_easy,gsm8k,humaneval]", "max_per_task=3",
                       "batch_size=1")
    one = evaluate(compose_config("eval", common))
    single = eval_section(artifacts)
    assert single["world_size"] == 1
    assert {k: v["total"] for k, v in single["tasks"].items()} == {"arc_easy": 3, "gsm8k": 3, "humaneval": 3}
    assert sorted(single["core_tasks"]) == ["cause_effect", "last_word", "pronoun_schema", "science_mc"]
    assert single["chat_loss_conversations"] == 5 and single["chat_loss"] > 0

    cmd = [sys.executable, "-m", "llm.eval", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    double = eval_section(artifacts)
    assert double.pop("world_size") == 2 and single.pop("world_size") == 1
    assert double == single  # every count and every float, bpb included, bit for bit
    assert one.bpb.bpb == double["val_bpb"]
    # the table on stdout, printed once (by rank 0)
    assert proc.stdout.count("| **ChatCORE** |") == 1
    for line in ("| arc_easy | categorical | 3 |", "| science_mc | core | 3 |", "| **val bpb** |", "| **chat loss** |"):
        assert line in proc.stdout


def test_results_accumulate_in_metrics_json(artifacts):
    (artifacts / "sft" / "metrics.json").write_text(json.dumps({"train_loss": 3.5, "wall_time_s": 12.0}))
    evaluate(compose_config("eval", overrides(artifacts, "tasks=[arc_easy]", "batch_size=2")))
    evaluate(compose_config("eval", overrides(artifacts, "tasks=[mmlu]", "max_per_task=4")))
    metrics = json.loads((artifacts / "sft" / "metrics.json").read_text())
    assert metrics["train_loss"] == 3.5 and metrics["wall_time_s"] == 12.0  # training's numbers stay
    tasks = metrics["eval"]["tasks"]
    assert tasks["arc_easy"]["total"] == 5 and tasks["arc_easy"]["max_per_task"] is None  # the whole fixture
    assert tasks["mmlu"]["total"] == 4 and tasks["mmlu"]["max_per_task"] == 4
    assert metrics["eval"]["chatcore_tasks"] == ["arc_easy", "mmlu"]
    assert metrics["eval"]["chatcore"] == pytest.approx((tasks["arc_easy"]["centered"] + tasks["mmlu"]["centered"]) / 2)


def test_base_artifact_defaults_to_bpb_and_core(artifacts, tmp_path, capsys):
    make_artifact(tmp_path, "base", sequence_len=64)
    (tmp_path / "heldout.jsonl").write_text((artifacts / "heldout.jsonl").read_text())
    cfg = compose_config("eval", overrides(tmp_path, "source=base", "max_per_task=2", "core.tasks=[last_word]"))
    results = evaluate(cfg)
    assert results.bpb is not None and list(results.core) == ["last_word"] and not results.tasks
    # without a bundle at hand the defaulted CORE is skipped with a note; asked for by name, it is an error
    results = evaluate(compose_config("eval", overrides(tmp_path, "source=base", f"core.bundle={tmp_path}/none",
                                                        "write_metrics=false")))
    assert results.bpb is not None and not results.core
    assert "CORE skipped: no eval bundle" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="core.bundle="):
        evaluate(compose_config("eval", overrides(tmp_path, "source=base", "tasks=[core]", f"core.bundle={tmp_path}")))


@pytest.fixture
def hub_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_offline_hub_task_names_the_local_file_options(artifacts, hub_offline):
    cfg = compose_config("eval", [f"paths.artifacts={artifacts}", "source=sft", "tasks=[arc_challenge]"])
    with pytest.raises(HubUnavailableError, match=r"task_options\.arc_challenge\.data_files=.*"
                                                  r"task_options\.arc_challenge\.source=fixture"):
        evaluate(cfg)


def test_bad_task_names_and_missing_artifacts_are_refused(artifacts, tmp_path, hub_offline):
    with pytest.raises(ValueError, match=r"unknown evaluation tasks \['arc_eesy'\]"):
        evaluate(compose_config("eval", overrides(artifacts, "tasks=[arc_eesy]")))
    with pytest.raises(ValueError, match="'smoltalk' cannot be evaluated"):
        evaluate(compose_config("eval", overrides(artifacts, "tasks=[smoltalk]")))
    with pytest.raises(FileNotFoundError, match="python -m llm.train stage=rl"):
        evaluate(compose_config("eval", overrides(tmp_path, "source=rl")))
