"""CORE: the DCLM eval-bundle format, nanochat's prompt rendering, and the aggregation to CORE."""

from __future__ import annotations

import json
import shutil

import pytest

from eval_support import BUNDLE, OracleModel, make_model, make_tokenizer
from llm.evaluate.core import (CoreTask, evaluate_core, evaluate_core_task, example_sequences, load_bundle,
                               render_prompts, score_example, task_data)
from llm.evaluate.results import centered, mean_centered
from llm.evaluate.sharding import Shard


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_bundle_loads_tasks_baselines_and_rows():
    tasks = load_bundle(BUNDLE)
    assert [t.label for t in tasks] == ["science_mc", "cause_effect", "pronoun_schema", "last_word"]
    assert [t.task_type for t in tasks] == ["multiple_choice", "multiple_choice", "schema", "language_modeling"]
    assert [t.num_fewshot for t in tasks] == [3, 0, 1, 2]
    assert [t.random_baseline for t in tasks] == [0.25, 0.5, 0.5, 0.0]  # the csv's percentages as fractions
    assert [len(t.rows) for t in tasks] == [8, 6, 6, 6]
    assert tasks[0].continuation_delimiter == "\nAnswer: "
    assert [t.label for t in load_bundle(BUNDLE, ["last_word", "science_mc"])] == ["science_mc", "last_word"]


def test_bundle_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="core.bundle="):
        load_bundle(tmp_path)
    with pytest.raises(ValueError, match="'nope'"):
        load_bundle(BUNDLE, ["nope"])
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE, copy)
    (copy / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nscience_mc,25\n")
    with pytest.raises(ValueError, match="no 'Random baseline' for task 'cause_effect'"):
        load_bundle(copy)


def test_prompts_render_like_nanochat_templates():
    mc = CoreTask("mc", "multiple_choice", 1, "\nA: ", 0.25, [])
    shot = {"query": "Q1?", "choices": ["x", "y"], "gold": 1}
    assert render_prompts(mc, {"query": "Q2?", "choices": ["a", "b"], "gold": 0}, [shot]) == [
        "Q1?\nA: y\n\nQ2?\nA: a", "Q1?\nA: y\n\nQ2?\nA: b"]
    schema = CoreTask("s", "schema", 1, " ", 0.5, [])
    shot = {"context_options": ["c1", "c2"], "continuation": "k", "gold": 1}
    assert render_prompts(schema, {"context_options": ["d1", "d2"], "continuation": "m", "gold": 0}, [shot]) == [
        "c2 k\n\nd1 m", "c2 k\n\nd2 m"]
    lm = CoreTask("lm", "language_modeling", 1, " ", 0.0, [])
    shot = {"context": " The sky is  ", "continuation": "blue"}
    # contexts are trimmed; the prompt without its continuation is stripped (no dangling delimiter)
    assert render_prompts(lm, {"context": "Grass is ", "continuation": "green"}, [shot]) == [
        "The sky is blue\n\nGrass is", "The sky is blue\n\nGrass is green"]


def test_scored_spans_are_the_continuations(tokenizer):
    tasks = {t.label: t for t in load_bundle(BUNDLE)}
    task = tasks["science_mc"]
    data = task_data(task)
    tokens, starts, ends = example_sequences(task, data, 0, tokenizer)
    item = data[0]
    for row, s, e, choice in zip(tokens, starts, ends, item["choices"]):
        assert row[0] == tokenizer.bos_id and e == len(row)
        assert tokenizer.decode(row[s:e]).endswith(choice)
        assert item["query"] in tokenizer.decode(row[:s])
    task = tasks["pronoun_schema"]
    tokens, starts, ends = example_sequences(task, task_data(task), 0, tokenizer)
    assert len({tuple(r[s:e]) for r, s, e in zip(tokens, starts, ends)}) == 1  # the shared continuation
    task = tasks["last_word"]
    data = task_data(task)
    (row,), (s,), (e,) = example_sequences(task, data, 0, tokenizer)
    assert tokenizer.decode(row[s:e]).strip() == data[0]["continuation"]
    assert tokenizer.decode(row).count("\n\n") == 2  # two few-shot examples before it


# Which rows (by position in the bundle's files) the rigged oracle answers right; the rest it gets wrong.
RIGHT = {"science_mc": {0, 1, 2, 3, 4, 5}, "cause_effect": {0, 2, 4}, "pronoun_schema": {0, 1, 2, 3, 4, 5},
         "last_word": {1, 3}}


def rig_oracle(tokenizer, tasks: list[CoreTask], max_per_task=None) -> OracleModel:
    """An oracle certain of the gold continuation of the RIGHT rows and of a wrong one for the others."""
    oracle = OracleModel(tokenizer.vocab_size)
    for task in tasks:
        data = task_data(task, max_per_task)
        for idx, item in enumerate(data):
            right = task.rows.index(item) in RIGHT[task.label]
            tokens, starts, ends = example_sequences(task, data, idx, tokenizer)
            if task.task_type == "language_modeling":
                if right:
                    oracle.register(tokens[0], starts[0])
                continue  # unregistered: all logits tie, argmax is token 0, never a continuation token
            pick = item["gold"] if right else (item["gold"] + 1) % len(tokens)
            oracle.register(tokens[pick], starts[pick])
    return oracle


def test_core_matches_hand_computed_centered_accuracies(tokenizer):
    tasks = load_bundle(BUNDLE)
    results = evaluate_core(rig_oracle(tokenizer, tasks), tokenizer, tasks, progress=False)
    accuracy = {k: (r.correct, r.total) for k, r in results.items()}
    assert accuracy == {"science_mc": (6, 8), "cause_effect": (3, 6), "pronoun_schema": (6, 6), "last_word": (2, 6)}
    # by hand: (0.75 - 0.25) / 0.75, (0.5 - 0.5) / 0.5, (1 - 0.5) / 0.5, (1/3 - 0) / 1
    expected = {"science_mc": 2 / 3, "cause_effect": 0.0, "pronoun_schema": 1.0, "last_word": 1 / 3}
    for label, value in expected.items():
        assert results[label].centered == pytest.approx(value)
    assert mean_centered(results) == pytest.approx((2 / 3 + 0 + 1 + 1 / 3) / 4) == pytest.approx(0.5)
    assert centered(0.25, 0.25) == 0 and centered(1.0, 0.25) == 1


def test_max_per_task_and_shards_cover_each_example_once(tokenizer):
    tasks = load_bundle(BUNDLE, ["science_mc"])
    oracle = rig_oracle(tokenizer, tasks, max_per_task=5)
    whole = evaluate_core_task(oracle, tokenizer, tasks[0], 5, progress=False)
    parts = [evaluate_core_task(oracle, tokenizer, tasks[0], 5, Shard(r, 2), progress=False) for r in (0, 1)]
    assert whole.total == 5 and [p.total for p in parts] == [3, 2]
    assert sum(p.correct for p in parts) == whole.correct
    rights = sum(task_data(tasks[0])[i] in [tasks[0].rows[j] for j in RIGHT["science_mc"]] for i in range(5))
    assert whole.correct == rights


def test_a_real_model_runs_every_task_type_and_long_rows_are_cropped(tokenizer):
    tasks = load_bundle(BUNDLE)
    model = make_model(tokenizer, sequence_len=32)  # shorter than the few-shot prompts: rows keep their tail
    for task in tasks:
        data = task_data(task, 3)
        assert len(example_sequences(task, data, 0, tokenizer)[0][0]) > 32 or task.num_fewshot == 0
        assert score_example(model, tokenizer, task, data, 0) in (True, False)


def test_fixture_rows_are_dclm_format():
    for task in load_bundle(BUNDLE):
        keys = {"multiple_choice": {"query", "choices", "gold"}, "schema": {"context_options", "continuation", "gold"},
                "language_modeling": {"context", "continuation"}}[task.task_type]
        assert all(set(row) == keys for row in task.rows), json.dumps(task.rows[0])
