"""lm-evaluation-harness on our GPT: local task YAMLs, the scores lm-eval sees are our model's, llm.eval records
them, and lm-eval's own HF backend on the export agrees."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from hf_support import REPO, random_artifact
from llm.artifact import load_artifact
from llm.eval import evaluate
from llm.evaluate.suite import SuiteSettings
from llm.generate.engine import Generator
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.reporting.report_card import render_report

lm_eval = pytest.importorskip("lm_eval")
from llm.evaluate.lm_eval_bridge import LmEvalSettings, run_lm_eval  # noqa: E402  (needs lm_eval)
from llm.evaluate.lm_eval_model import NanochatLM  # noqa: E402

TASKS = REPO / "tests" / "fixtures" / "lm_eval"
LOCAL = LmEvalSettings(include_path=(str(TASKS),), include_defaults=False)
ROWS = len((TASKS / "tiny.jsonl").read_text().splitlines())
TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the task YAMLs name their jsonl relative to the repository root


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("lm_eval")
    random_artifact(folder / "sft", tokenizer, {"train_loss": 3.0}, sequence_len=128)
    return folder


@pytest.fixture(scope="module")
def loaded(artifacts):
    model, tokenizer, _ = load_artifact(artifacts / "sft")
    return model, tokenizer


def sequence_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log p(ids[i] | ids[:i]) for i >= start from one unpadded forward pass, and whether each was the argmax."""
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)[start - 1:]
    targets = torch.tensor(ids[start:])
    return float(logprobs.gather(-1, targets[:, None]).sum()), bool((logprobs.argmax(-1) == targets).all())


def our_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The continuation's log-probability, context/continuation boundary as lm-eval's HF backend draws it."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = tokenizer.encode(context + continuation, prepend_bos=True)
    return sequence_logprob(model, whole, len(tokenizer.encode(context, prepend_bos=True)) if context else 1)


def test_local_multiple_choice_task_scores_our_loglikelihoods(loaded):
    model, tokenizer = loaded
    started = time.perf_counter()
    raw = run_lm_eval(model, tokenizer, ["nanochat_tiny_mc"], LOCAL, batch_size=4, progress=False, log_samples=True)
    seconds = time.perf_counter() - started
    samples = raw["samples"]["nanochat_tiny_mc"]
    requests = sum(len(s["arguments"]) for s in samples)
    print(f"lm-eval: {requests} loglikelihood requests in {seconds:.2f}s ({requests / seconds:.1f} requests/s)")
    accuracy = raw["results"]["nanochat_tiny_mc"]["acc,none"]
    assert 0 <= accuracy <= 1 and len(samples) == ROWS
    right = 0
    for sample in samples:
        seen = [resp[0] for resp in sample["resps"]]  # (loglikelihood, is_greedy) per choice
        for (context, continuation), (loglikelihood, greedy) in zip(sample["arguments"], seen):
            expected, expected_greedy = our_logprob(model, tokenizer, context, continuation)
            assert loglikelihood == pytest.approx(expected, abs=TOLERANCE) and greedy == expected_greedy
        right += max(range(len(seen)), key=lambda i: seen[i][0]) == sample["target"]
    assert accuracy == right / ROWS


def test_generation_and_perplexity_tasks_use_our_generator_and_logprobs(loaded):
    model, tokenizer = loaded
    raw = run_lm_eval(model, tokenizer, ["nanochat_tiny_gen", "nanochat_tiny_ppl"], LOCAL, batch_size=5,
                      progress=False, log_samples=True)
    generator = Generator(model, tokenizer, tool=None)
    for sample in raw["samples"]["nanochat_tiny_gen"]:
        (context, _), = sample["arguments"]
        (ids, _), = generator.generate_batch([tokenizer.encode(context, prepend_bos=True)],
                                             Sampling(max_tokens=8, temperature=0.0))
        text = completion_text(tokenizer, ids).split("\n")[0].split(".")[0]
        assert sample["resps"][0][0] == text
    for sample in raw["samples"]["nanochat_tiny_ppl"]:
        (text,), = sample["arguments"]
        assert sample["resps"][0][0] == pytest.approx(our_logprob(model, tokenizer, "", text)[0], abs=TOLERANCE)
    assert raw["results"]["nanochat_tiny_ppl"]["bits_per_byte,none"] > 0


def test_context_and_continuation_split_as_lm_evals_hf_backend(loaded):
    model, tokenizer = loaded
    lm = NanochatLM(model, tokenizer)
    context, continuation = lm._encode_pair("Question: hi\nAnswer: ", "Paris")  # the trailing space moves over
    assert context == tokenizer.encode("Question: hi\nAnswer:", prepend_bos=True)
    assert context + continuation == tokenizer.encode("Question: hi\nAnswer: Paris", prepend_bos=True)
    assert lm.prefix_token_id == tokenizer.bos_id  # an empty context is <|bos|> alone


def test_registered_model_loads_an_artifact(artifacts, loaded):
    from llm.evaluate.lm_eval_bridge import task_manager

    raw = lm_eval.simple_evaluate(model="nanochat-lightning", model_args=f"source={artifacts / 'sft'},batch_size=3",
                                  tasks=["nanochat_tiny_mc"], task_manager=task_manager(LOCAL.include_path, False),
                                  verbosity="WARNING")
    direct = run_lm_eval(*loaded, ["nanochat_tiny_mc"], LOCAL, batch_size=4, progress=False)
    assert raw["results"]["nanochat_tiny_mc"]["acc,none"] == direct["results"]["nanochat_tiny_mc"]["acc,none"]


def test_lm_evals_hf_backend_on_the_export_sees_the_same_loglikelihoods(artifacts, loaded):
    """The export scores as our model does, through lm-eval's own transformers backend (lm_eval --model hf)."""
    from llm.evaluate.lm_eval_bridge import task_manager
    from llm.huggingface.folder import export_folder

    model, tokenizer = loaded
    exported = export_folder(artifacts / "sft", artifacts / "hf", overwrite=True)
    tasks = ["nanochat_tiny_mc", "nanochat_tiny_ppl"]
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=tasks,
                                 batch_size=4, device="cpu", task_manager=task_manager(LOCAL.include_path, False),
                                 log_samples=True, verbosity="WARNING")
    ours = run_lm_eval(model, tokenizer, tasks, LOCAL, batch_size=4, progress=False, log_samples=True)
    for theirs, mine in zip(hf["samples"]["nanochat_tiny_mc"], ours["samples"]["nanochat_tiny_mc"]):
        assert [r[0][0] for r in theirs["resps"]] == pytest.approx([r[0][0] for r in mine["resps"]], abs=TOLERANCE)
    # rolling: lm-eval prefixes <|bos|> to what the tokenizer encoded, which already starts with one, so the HF
    # backend scores a second <|bos|> and the text after two; ours scores the text after one
    for theirs, mine in zip(hf["samples"]["nanochat_tiny_ppl"], ours["samples"]["nanochat_tiny_ppl"]):
        (text,), = mine["arguments"]
        assert mine["resps"][0][0] == pytest.approx(our_logprob(model, tokenizer, "", text)[0], abs=TOLERANCE)
        twice = sequence_logprob(model, [tokenizer.bos_id, *tokenizer.encode(text, prepend_bos=True)], 1)[0]
        assert theirs["resps"][0][0] == pytest.approx(twice, abs=TOLERANCE)


def test_unknown_tasks_are_named(loaded):
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\].*include_path"):
        run_lm_eval(*loaded, ["no_such_task"], LOCAL, batch_size=1)
    with pytest.raises(ValueError, match="names no lm-eval task"):
        SuiteSettings(tasks=["lm_eval:"])


# ----------------------------------------------------------------------------- python -m llm.eval


def eval_overrides(artifacts, tasks: str, *extra: str) -> list[str]:
    return [f"paths.artifacts={artifacts}", "source=sft", f"tasks=[{tasks}]", "trainer.precision=32-true",
            "progress=false", f"lm_eval.include_path=[{TASKS}]", "lm_eval.include_defaults=false", *extra]


def lm_eval_section(artifacts) -> dict:
    return json.loads((artifacts / "sft" / "metrics.json").read_text())["eval"]["lm_eval"]


def test_llm_eval_merges_lm_eval_results_into_metrics_and_the_report(artifacts, capsys):
    evaluate(compose_config("eval", eval_overrides(artifacts, "lm_eval:nanochat_tiny_mc", "batch_size=4")))
    assert "| lm_eval:nanochat_tiny_mc | lm-eval acc | 12 |" in capsys.readouterr().out
    evaluate(compose_config("eval", eval_overrides(artifacts, "lm_eval:nanochat_tiny_ppl", "max_per_task=5")))
    records = lm_eval_section(artifacts)
    assert set(records) == {"nanochat_tiny_mc", "nanochat_tiny_ppl"}  # the second run kept the first's
    mc, ppl = records["nanochat_tiny_mc"], records["nanochat_tiny_ppl"]
    assert mc["metric"] == "acc" and 0 <= mc["value"] <= 1 and mc["n"] == ROWS and "acc_norm" in mc["metrics"]
    assert ppl["n"] == 5 and ppl["max_per_task"] == 5
    report = render_report(artifacts, artifacts / "report.md", ["sft"], ["train/loss"])
    assert "lm-evaluation-harness:" in report and f"nanochat_tiny_mc acc {mc['value']:.4f}" in report


@pytest.mark.slow
def test_two_processes_give_the_one_process_scores(artifacts, tmp_path):
    tasks = "lm_eval:nanochat_tiny_mc"  # 12 documents, so each rank scores 6 and lm-eval gathers them
    evaluate(compose_config("eval", eval_overrides(artifacts, tasks, "batch_size=2")))
    single = lm_eval_section(artifacts)
    cmd = [sys.executable, "-m", "llm.eval", *eval_overrides(artifacts, tasks, "batch_size=2"), "trainer=ddp",
           "trainer.accelerator=cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    double = lm_eval_section(artifacts)
    assert double["nanochat_tiny_mc"]["n"] == single["nanochat_tiny_mc"]["n"] == ROWS
    assert double["nanochat_tiny_mc"]["metrics"] == single["nanochat_tiny_mc"]["metrics"]
