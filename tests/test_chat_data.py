"""ChatDataModule: padded rows with -1 targets, rank sharding, epochs, exact resume, held-out validation."""

from __future__ import annotations

import collections
import itertools
import json

import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from conftest import compose_config
from llm.data.chat import ChatDataModule, render_row

B, T = 4, 128
SMALL = [{"name": "arithmetic", "size": 30}, {"name": "simple_spelling", "size": 20}]
VAL = [{"name": "arithmetic", "split": "test", "size": 10}]


def module(tokenizer_dir, tasks=SMALL, **kw) -> ChatDataModule:
    kw = {"batch_size": B, "seq_len": T, "num_workers": 0, **kw}
    return ChatDataModule(tasks, VAL, str(tokenizer_dir), **kw)


def take(batches, n, num_workers=0):
    return list(itertools.islice(iter(DataLoader(batches, batch_size=None, num_workers=num_workers)), n))


def rows(stream, n):
    """Mixture indices of the first n rows of a rank's stream."""
    return [stream.mixture_index(p) for p in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["inputs"], y["inputs"]) and torch.equal(x["targets"], y["targets"])
        and torch.equal(x["cursor"], y["cursor"]) for x, y in zip(a, b))


def test_rows_are_padded_conversations_with_masked_targets(tokenizer, tokenizer_dir):
    dm = module(tokenizer_dir)
    batch = take(dm.train_batches(), 1)[0]
    assert batch["inputs"].shape == batch["targets"].shape == (B, T)
    real = 0
    for j in range(B):
        conversation = dm.train_mixture[j]
        ids, mask = tokenizer.render_conversation(conversation)
        n = len(ids) - 1
        assert n < T  # these conversations fit: the rest of the row is padding
        assert batch["inputs"][j, :n].tolist() == ids[:-1]
        assert batch["inputs"][j, n:].eq(tokenizer.bos_id).all()
        assert batch["targets"][j, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert batch["targets"][j, n:].eq(-1).all()
        real += n
    assert batch["cursor"].tolist() == [0, B]
    assert int(batch["tokens"]) == real  # what throughput counts: the rows' tokens, padding left out


def test_long_conversations_are_cut_to_the_row(tokenizer):
    long = {"messages": [{"role": "user", "content": "hi " * 200}, {"role": "assistant", "content": "ok " * 200}]}
    inputs, targets, length = render_row(tokenizer, long, 16)
    ids, mask = tokenizer.render_conversation(long, max_tokens=17)
    assert inputs == ids[:16] and len(targets) == 16 and length == 16


def test_same_seed_same_order_other_seed_other_order(tokenizer_dir):
    a, b, c = (module(tokenizer_dir, seed=s) for s in (7, 7, 8))
    assert same(take(a.train_batches(), 5), take(b.train_batches(), 5))
    first = [[dm.train_mixture[i]["messages"] for i in rows(dm.train_batches(), 50)] for dm in (a, b, c)]
    assert first[0] == first[1] != first[2]


def test_two_ranks_read_disjoint_rows_that_cover_the_epoch(tokenizer, tokenizer_dir):
    dm = module(tokenizer_dir, tasks=[{"name": "arithmetic", "size": 31}])  # odd: one row is left out
    ranks = [dm.train_batches(rank=r, world_size=2) for r in range(2)]
    seen = [rows(stream, stream.rows_per_epoch) for stream in ranks]
    assert ranks[0].rows_per_epoch == ranks[1].rows_per_epoch == 15
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 30
    # and the batches really hold those rows
    batches = take(ranks[1], 2)
    expected = [render_row(tokenizer, dm.train_mixture[i], T)[0] for i in seen[1][:2 * B]]
    assert [r for b in batches for r in b["inputs"].tolist()] == expected


def test_epochs_reshuffle_and_run_on_without_short_batches(tokenizer_dir):
    dm = module(tokenizer_dir, tasks=[{"name": "arithmetic", "size": 10}])
    stream = dm.train_batches()
    epoch0, epoch1 = rows(stream, 10), [stream.mixture_index(p) for p in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    batches = take(stream, 6)  # 24 rows: two epochs and a bit, batches straddle the epoch ends
    assert all(b["inputs"].shape == (B, T) for b in batches)
    assert [float(b["epoch"]) for b in batches] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0, 2.4])


def test_rank_streams_keep_the_mixture_proportions(tokenizer_dir):
    tasks = [{"name": "arithmetic", "size": 40, "weight": 3}, {"name": "simple_spelling", "size": 40, "weight": 1}]
    dm = module(tokenizer_dir, tasks=tasks, size=2000)
    for rank in range(2):
        stream = dm.train_batches(rank=rank, world_size=2)
        counts = collections.Counter(dm.train_mixture.example(i)[0] for i in rows(stream, stream.rows_per_epoch))
        assert counts[0] / stream.rows_per_epoch == pytest.approx(0.75, abs=0.04)


def test_workers_return_batches_in_stream_order(tokenizer_dir):
    dm = module(tokenizer_dir)
    assert same(take(dm.train_batches(start=8), 7, num_workers=2), take(dm.train_batches(start=8), 7))


def test_resume_continues_with_the_same_next_batches(tokenizer_dir):
    dm = module(tokenizer_dir, num_workers=2)
    reference = take(dm.train_batches(), 9)
    for batch in reference[:5]:  # five batches trained, the loader had prefetched more
        dm.mark_consumed(batch["cursor"])
    state = dm.state_dict()
    assert state["ranks"] == [{"rows": 5 * B}]
    fresh = module(tokenizer_dir, num_workers=2)
    fresh.load_state_dict(state)
    assert same(take(fresh.train_dataloader().dataset, 4, num_workers=2), reference[5:9])


def test_resume_refuses_another_mixture_or_world(tokenizer_dir):
    dm = module(tokenizer_dir)
    state = dm.state_dict()
    with pytest.raises(ValueError, match="training mixture changed"):
        module(tokenizer_dir, tasks=[{"name": "arithmetic", "size": 31}]).load_state_dict(state)
    with pytest.raises(ValueError, match="2 ranks"):
        dm.load_state_dict({**state, "ranks": state["ranks"] * 2})


def test_validation_is_finite_disjoint_across_ranks_and_in_order(tokenizer_dir):
    dm = module(tokenizer_dir)
    one = take(dm.val_batches(), 100)
    assert [b["inputs"].size(0) for b in one] == [4, 4, 2]  # 10 conversations, the last batch short
    assert same(one, take(dm.val_batches(), 100))
    halves = [rows(dm.val_batches(r, 2), 5) for r in range(2)]
    assert sorted(halves[0] + halves[1]) == list(range(10))


def test_epoch_length(tokenizer_dir):
    dm = module(tokenizer_dir)  # 50 rows
    assert dm.epoch_length(world_size=1) == 50 and dm.epoch_length(world_size=2) == 50
    assert dm.epoch_length(world_size=3) == 48  # every rank gets as many rows


def test_bad_specs_fail_early(tokenizer_dir):
    with pytest.raises(ValueError, match="data.tasks is empty"):
        module(tokenizer_dir, tasks=[])
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        module(tokenizer_dir, tasks=["nope"])


@pytest.mark.parametrize("data", ["mid_mix", "sft_mix"])
def test_default_mixtures_are_offline_and_validation_is_held_out(tokenizer_dir, data):
    cfg = compose_config("train", [f"data={data}", f"tokenizer_dir={tokenizer_dir}"])
    dm = instantiate(cfg.data, tokenizer_dir=str(tokenizer_dir), batch_size=cfg.stage.batch.per_device, _convert_="all")
    assert isinstance(dm, ChatDataModule) and len(dm.train_mixture) > 8000
    key = lambda c: json.dumps(c["messages"], sort_keys=True)  # noqa: E731
    train = {key(c) for c in dm.train_mixture}
    held_out = [key(c) for c in dm.val_mixture]
    assert len(held_out) == 464 and not train.intersection(held_out)


def test_stage_configs_pick_the_mixture_and_overrides_change_it(tokenizer_dir):
    assert compose_config("train", ["stage=mid"]).data.tasks[2] == "gsm8k"
    cfg = compose_config("train", ["stage=sft", f"tokenizer_dir={tokenizer_dir}",
                                   "data.tasks=[gsm8k,{name:identity,start:16}]"])
    dm = instantiate(cfg.data, tokenizer_dir=str(tokenizer_dir), batch_size=cfg.stage.batch.per_device, _convert_="all")
    assert [t.name for t in dm.train_mixture.tasks] == ["gsm8k", "identity"]
    assert len(dm.train_mixture) == 7473 + 71 - 16
