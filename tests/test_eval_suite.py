"""The pieces around the evaluators: sharding, held-out bpb, results, the metrics.json record, the table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eval_support import make_model, make_tokenizer
from llm.evaluate.chat_loss import evaluate_chat_loss
from llm.evaluate.heldout import evaluate_bpb, heldout_rows
from llm.evaluate.record import merge_eval
from llm.evaluate.results import Accuracy, TaskResult, centered, mean_centered
from llm.evaluate.sharding import Shard
from llm.evaluate.suite import SuiteResults, SuiteSettings
from llm.tasks import build_task


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("n, batch, world", [(0, 3, 2), (1, 4, 3), (10, 3, 2), (10, 3, 4), (7, 1, 2), (9, 10, 2)])
def test_ranks_split_the_one_process_batches_between_them(n, batch, world):
    single = Shard().batches(n, batch)
    shares = [Shard(r, world).batches(n, batch) for r in range(world)]
    assert sorted((b for s in shares for b in s), key=lambda b: b.start) == single  # the very same batches
    assert sorted(i for s in shares for b in s for i in b) == list(range(n))
    assert sorted(i for r in range(world) for i in Shard(r, world).items(n)) == list(range(n))


def test_bad_shards_are_refused():
    with pytest.raises(ValueError, match="rank=2"):
        Shard(2, 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        Shard().batches(5, 0)


def test_chat_loss_is_the_mean_loss_of_the_assistant_tokens(tokenizer):
    model = make_model(tokenizer, sequence_len=48)  # long conversations are cut to the row
    conversations = build_task("identity", "train")[:5]
    result = evaluate_chat_loss(model, tokenizer, conversations, batch_size=2, progress=False)
    nats, count = 0.0, 0
    for conversation in conversations:  # one at a time, from the rendering and its mask
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=49)
        inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
        learned = torch.tensor([mask[1:]], dtype=torch.bool)
        with torch.no_grad():
            losses = F.cross_entropy(model(inputs)[0], targets[0], reduction="none")
        nats += float(losses[learned[0]].double().sum())
        count += int(learned.sum())
    assert (result.tokens, result.conversations) == (count, 5)
    assert result.loss == pytest.approx(nats / count, rel=1e-6)


def test_heldout_rows_pack_bos_delimited_documents(tokenizer):
    texts = ["first document", "second one, a little longer", "third"]
    stream = [t for text in texts for t in tokenizer.encode(text, prepend_bos=True)]
    rows = heldout_rows(tokenizer, texts, row_len=5)
    assert rows.shape == (len(stream) // 5, 5) and rows.flatten().tolist() == stream[:rows.numel()]
    assert heldout_rows(tokenizer, texts * 10, row_len=5, max_tokens=12).shape == (2, 5)
    with pytest.raises(ValueError, match="fewer than one row"):
        heldout_rows(tokenizer, ["a"], row_len=64)


def test_bpb_is_nats_over_bytes_of_the_predicted_tokens(tokenizer):
    model = make_model(tokenizer, sequence_len=16)
    rows = heldout_rows(tokenizer, ["The quick brown fox jumps over the lazy dog."] * 8, row_len=17)
    result = evaluate_bpb(model, tokenizer, rows, batch_size=3, progress=False)
    with torch.no_grad():
        losses = F.cross_entropy(model(rows[:, :-1]).flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
    nbytes = tokenizer.token_bytes()[rows[:, 1:].flatten()]
    expected = losses[nbytes > 0].double().sum() / (math.log(2) * nbytes.sum())
    assert result.bpb == pytest.approx(float(expected), rel=1e-6)
    assert result.tokens == rows.numel() - len(rows)
    assert evaluate_bpb(model, tokenizer, rows, batch_size=1, progress=False).bpb == pytest.approx(result.bpb, rel=1e-6)


def test_accuracy_counts_and_centering():
    metric = Accuracy()
    metric.update([True, False, True])
    metric.update(torch.tensor([False]))
    assert metric.compute() == (2, 4)
    r = TaskResult("mmlu", "categorical", 2, 4, 0.25)
    assert r.accuracy == 0.5 and r.centered == pytest.approx(1 / 3)
    assert r.to_dict()["centered"] == r.centered
    assert centered(0.0, 0.0) == 0.0 and mean_centered({}) is None
    with pytest.raises(ValueError, match="chance=1"):
        centered(0.5, 1)


def result(task, correct, total, chance):
    return TaskResult(task, "categorical" if chance else "generative", correct, total, chance).to_dict()


def test_eval_records_accumulate_and_recompute_aggregates():
    first = merge_eval(None, {"tasks": {"arc_easy": result("arc_easy", 1, 2, 0.25)}, "val_bpb": 1.5})
    assert first["chatcore"] == pytest.approx(1 / 3) and first["val_bpb"] == 1.5
    second = merge_eval(first, {"tasks": {"gsm8k": result("gsm8k", 1, 4, 0.0)},
                                "core_tasks": {"copa": result("copa", 3, 4, 0.5)}})
    assert second["chatcore_tasks"] == ["arc_easy", "gsm8k"] and second["val_bpb"] == 1.5
    assert second["chatcore"] == pytest.approx((1 / 3 + 0.25) / 2) and second["core"] == pytest.approx(0.5)
    again = merge_eval(second, {"tasks": {"arc_easy": result("arc_easy", 2, 2, 0.25)}})  # a re-run replaces
    assert again["tasks"]["arc_easy"]["correct"] == 2 and again["chatcore"] == pytest.approx((1 + 0.25) / 2)
    # the aggregate does not depend on the order tasks were merged in
    tasks = {f"t{i}": result(f"t{i}", i, 7, 0.25) for i in range(7)}
    forward = merge_eval(None, {"tasks": tasks})["chatcore"]
    assert merge_eval(None, {"tasks": dict(reversed(tasks.items()))})["chatcore"] == forward


def test_table_shows_every_score():
    results = SuiteResults(tasks={"arc_easy": TaskResult("arc_easy", "categorical", 3, 4, 0.25)},
                           core={"copa": TaskResult("copa", "core", 1, 2, 0.5)})
    table = results.table()
    assert "| arc_easy | categorical | 4 | 75.00% | 0.6667 |" in table
    assert "| copa | core | 2 | 50.00% | 0.0000 |" in table
    assert "| **ChatCORE** | mean of 1 |  |  | 0.6667 |" in table and "| **CORE** | mean of 1 |" in table


def test_settings_refuse_unknown_and_train_only_tasks():
    with pytest.raises(ValueError, match=r"unknown evaluation tasks \['gsm9k'\]"):
        SuiteSettings(tasks=["gsm9k"])
    with pytest.raises(ValueError, match="'smoltalk' cannot be evaluated"):
        SuiteSettings(tasks=["smoltalk"])
