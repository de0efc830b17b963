"""PretrainDataModule: packing, rank/worker sharding, held-out validation, exact resume."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader

from llm.data.pretrain import PackedTokenStream, PretrainDataModule
from llm.data.sources import TextSource, iter_texts

B, T, VAL_DOCS = 2, 32, 20


def stream(tokenizer_dir, rank=0, world=1, val=False):
    first, last = (0, VAL_DOCS) if val else (VAL_DOCS, None)
    return PackedTokenStream(TextSource(), str(tokenizer_dir), B, T, first, last, rank, world)


def take(dataset, n, num_workers=0):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return list(itertools.islice(iter(loader), n))


def rows_of(batches):
    return [tuple(row.tolist()) for b in batches for row in b["tokens"]]


def test_rows_pack_bos_delimited_documents(tokenizer, tokenizer_dir):
    batches = take(stream(tokenizer_dir), 6)
    assert all(b["tokens"].shape == (B, T + 1) and b["tokens"].dtype == torch.long for b in batches)
    # consecutive rows overlap by one token: row j's last token is row j+1's first input
    rows = [row for b in batches for row in b["tokens"].tolist()]
    for a, b in zip(rows, rows[1:]):
        assert a[-1] == b[0]
    packed = rows[0] + [t for row in rows[1:] for t in row[1:]]
    docs = iter_texts(TextSource(), start=VAL_DOCS)
    expected = [t for text in itertools.islice(docs, 50) for t in [tokenizer.bos_id] + tokenizer.encode(text)]
    assert packed == expected[: len(packed)]


def test_ranks_and_workers_see_disjoint_rows(tokenizer_dir):
    seen = {}
    for rank in range(2):
        for batch in take(stream(tokenizer_dir, rank=rank, world=2), 8, num_workers=2):
            shard = int(batch["cursor"][0])
            assert shard // 2 == rank  # rank r's workers read shards 2r, 2r+1
            assert (int(batch["cursor"][2]) - VAL_DOCS) % 4 == shard  # documents of its own shard only
            seen.setdefault(shard, []).extend(rows_of([batch]))
    assert sorted(seen) == [0, 1, 2, 3]
    all_rows = [r for rows in seen.values() for r in rows]
    assert len(set(all_rows)) == len(all_rows)


def test_validation_never_overlaps_training(tokenizer_dir):
    val = take(stream(tokenizer_dir, val=True), 30)
    train = take(stream(tokenizer_dir), 30)
    assert all(int(b["cursor"][2]) < VAL_DOCS for b in val)
    assert all(int(b["cursor"][2]) >= VAL_DOCS for b in train)
    assert not set(rows_of(val)) & set(rows_of(train))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_same_batches(tokenizer_dir, num_workers):
    def datamodule():
        return PretrainDataModule(TextSource(), str(tokenizer_dir), B, T, num_workers=num_workers,
                                  val_docs=VAL_DOCS)

    uninterrupted = take_loader(datamodule().train_dataloader(), 9)
    first = datamodule()
    for batch in take_loader(first.train_dataloader(), 5):
        first.mark_consumed(batch["cursor"])
    resumed = datamodule()
    resumed.load_state_dict(first.state_dict())
    after = take_loader(resumed.train_dataloader(), 4)
    assert [b["tokens"].tolist() for b in after] == [b["tokens"].tolist() for b in uninterrupted[5:]]


def take_loader(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_resume_with_another_world_size_is_refused(tokenizer_dir):
    dm = PretrainDataModule(TextSource(), str(tokenizer_dir), B, T, num_workers=1, val_docs=VAL_DOCS)
    state = dm.state_dict()
    state["ranks"].append(state["ranks"][0])  # as if saved by 2 ranks
    with pytest.raises(ValueError, match="2 ranks"):
        dm.load_state_dict(state)
