"""PretrainDataModule: documents -> tokens -> packed (B, T+1) rows, sharded and resumable.

Every document is tokenized on the fly (in DataLoader workers) and prefixed with <|bos|>; the token
stream is cut into batches of B rows of T+1 tokens, where row j holds stream[j*T : j*T+T+1] (inputs
are row[:-1], targets row[1:], so every token of the stream is predicted exactly once).

Sharding: document i (counted after the held-out validation documents) belongs to shard
i % (world_size * num_workers); rank r's worker w reads shard r * num_workers + w, so ranks and
workers never see the same rows. Validation uses the first `val_docs` documents, which training
never reads.

Resume: each batch carries its shard's cursor (epoch, document, token offset) at the batch's end.
The module reports consumed batches back through `mark_consumed`, the cursors go into the Lightning
checkpoint, and a resumed run restarts every shard at its cursor and keeps the workers' round-robin
order, so it sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llm.data.sources import TextSource, iter_texts, load_documents
from llm.data.loading import StageDataModule, batch_loader, gather_from_ranks, rank_and_world
from llm.tokenizer import Tokenizer

_ENCODE_CHUNK = 64  # documents tokenized per call (sentencepiece batches them in C++)


@dataclass(frozen=True)
class Cursor:
    epoch: int = 0
    doc: int = 0     # index of the document inside its shard's split, counted over the whole source
    offset: int = 0  # tokens of that document (after <|bos|>) already used


class PackedTokenStream(IterableDataset):
    """Yields {"tokens": (B, T+1) int64, "cursor": [shard, epoch, doc, offset]} for one rank."""

    def __init__(self, source: TextSource, tokenizer_dir: str, batch_size: int, seq_len: int,
                 first_doc: int, last_doc: int | None, rank: int, world_size: int,
                 cursors: dict[int, Cursor] | None = None, rotation: int = 0):
        self.source, self.tokenizer_dir = source, tokenizer_dir
        self.batch_size, self.seq_len = batch_size, seq_len
        self.first_doc, self.last_doc = first_doc, last_doc
        self.rank, self.world_size = rank, world_size
        self.cursors = cursors or {}
        self.rotation = rotation  # resumed runs start at the worker whose turn was next

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.rotation) % num_workers
        shard = self.rank * num_workers + worker
        num_shards = self.world_size * num_workers
        tokenizer = Tokenizer.load(self.tokenizer_dir)
        yield from self._batches(tokenizer, shard, num_shards, self.cursors.get(shard, Cursor()))

    def _documents(self, tokenizer: Tokenizer, shard: int, num_shards: int, cursor: Cursor):
        """(epoch, doc index, token ids) of this shard's documents from the cursor on, looping forever."""
        epoch, start = cursor.epoch, cursor.doc
        while True:
            found = False
            texts = iter_texts(self.source, self.first_doc, self.last_doc)
            pending: list[tuple[int, str]] = []
            for i, text in enumerate(texts, start=self.first_doc):
                if (i - self.first_doc) % num_shards != shard or i < start:
                    continue
                pending.append((i, text))
                if len(pending) == _ENCODE_CHUNK:
                    yield from self._encode(tokenizer, epoch, pending)
                    pending, found = [], True
            if pending:
                yield from self._encode(tokenizer, epoch, pending)
                found = True
            if not found:
                raise ValueError(f"shard {shard} of {num_shards} got no documents: the source has too few "
                                 f"documents for {self.world_size} ranks x workers (or data.val_docs is too large)")
            epoch, start = epoch + 1, 0

    @staticmethod
    def _encode(tokenizer: Tokenizer, epoch: int, pending: list[tuple[int, str]]):
        encoded = tokenizer.encode_batch([text for _, text in pending], prepend_bos=True)
        for (i, _), ids in zip(pending, encoded):
            yield epoch, i, ids

    def _batches(self, tokenizer: Tokenizer, shard: int, num_shards: int, cursor: Cursor):
        B, T = self.batch_size, self.seq_len
        need = B * T + 1
        buf: list[int] = []
        pieces: list[tuple[int, int, int, int]] = []  # (position in buf, epoch, doc, offset in doc)
        skip = cursor.offset
        for epoch, doc, ids in self._documents(tokenizer, shard, num_shards, cursor):
            pieces.append((len(buf), epoch, doc, skip))
            buf.extend(ids[skip:])
            skip = 0
            while len(buf) >= need:
                rows = torch.tensor(buf[:need], dtype=torch.long).unfold(0, T + 1, T)  # (B, T+1)
                # the stream restarts at position B*T (the last row's target is the next row's input)
                cut = B * T
                k = max(j for j, p in enumerate(pieces) if p[0] <= cut)
                pos, ep, d, off = pieces[k]
                pieces = [(p - cut, e, dd, o) for p, e, dd, o in pieces[k + 1:]]
                pieces.insert(0, (0, ep, d, off + (cut - pos)))
                buf = buf[cut:]
                yield {"tokens": rows.contiguous(),
                       "cursor": torch.tensor([shard, ep, d, off + (cut - pos)], dtype=torch.long)}


class PretrainDataModule(StageDataModule):
    def __init__(self, source: TextSource, tokenizer_dir: str, batch_size: int, seq_len: int, num_workers: int,
                 val_docs: int):
        super().__init__()
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.seq_len={seq_len} must be positive")
        if val_docs < 1:
            raise ValueError(f"data.val_docs={val_docs}: hold out at least one document for validation")
        self.source, self.tokenizer_dir = source, str(tokenizer_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.num_workers, self.val_docs = num_workers, val_docs
        self.cursors: dict[int, Cursor] = {}
        self.batches_consumed = 0

    def setup(self, stage: str) -> None:
        load_documents(self.source)  # an unreachable hub or unreadable file fails here, before training

    # ---- the two loaders -------------------------------------------------------------------

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        workers = max(self.num_workers, 1)
        stream = PackedTokenStream(self.source, self.tokenizer_dir, self.batch_size, self.seq_len,
                                   first_doc=self.val_docs, last_doc=None, rank=rank, world_size=world,
                                   cursors=dict(self.cursors), rotation=self.batches_consumed % workers)
        return batch_loader(stream, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        stream = PackedTokenStream(self.source, self.tokenizer_dir, self.batch_size, self.seq_len,
                                   first_doc=0, last_doc=self.val_docs, rank=rank, world_size=world)
        return batch_loader(stream, 0)

    # ---- resumable position ----------------------------------------------------------------

    def mark_consumed(self, cursor: torch.Tensor) -> None:
        """Called by the training step for each batch it trained on."""
        shard, epoch, doc, offset = (int(x) for x in cursor.tolist())
        self.cursors[shard] = Cursor(epoch, doc, offset)
        self.batches_consumed += 1

    def state_dict(self) -> dict:
        mine = {"cursors": {s: vars(c) for s, c in self.cursors.items()}, "batches": self.batches_consumed}
        ranks = gather_from_ranks(mine)  # Lightning stores rank 0's copy only; resume needs every rank's
        return {"ranks": ranks, "num_workers": max(self.num_workers, 1)}

    def load_state_dict(self, state: dict) -> None:
        rank, world = rank_and_world(self.trainer)
        saved_world, saved_workers = len(state["ranks"]), state["num_workers"]
        if (saved_world, saved_workers) != (world, max(self.num_workers, 1)):
            raise ValueError(
                f"the checkpoint's data position was saved with {saved_world} ranks x {saved_workers} workers, "
                f"this run has {world} x {max(self.num_workers, 1)}: resume with the same trainer.devices and "
                f"data.num_workers, or start fresh with resume=false")
        mine = state["ranks"][rank]
        self.cursors = {int(s): Cursor(**c) for s, c in mine["cursors"].items()}
        self.batches_consumed = mine["batches"]
