"""ChatDataModule: a weighted task mixture -> rendered conversations -> padded (B, T) batches.

Layout: one conversation per row. Each is rendered (Tokenizer.render_conversation), cut to T + 1
tokens and split into inputs ids[:-1] and targets ids[1:]; a target is -1 wherever the assistant is
not the one writing it (user turns, tool outputs, padding), so `GPT(inputs, targets=targets)` is the
masked loss. Rows shorter than T are padded with <|bos|> inputs and -1 targets. We pad rather than
pack several conversations into a row because GPT's attention is plain causal: packed conversations
would attend to each other, and keeping attention inside each one needs document masking the model
does not have. Padding wastes the slots after short conversations; that is the price of honest rows.

Order: the training mixture (llm.tasks.build_mixture, shuffled with `seed`) is epoch 0; epoch e > 0
is the same rows in another fixed-seed order. Inside an epoch, row i belongs to rank i % world_size
(the last len % world_size rows are left out so every rank has as many rows). A rank's stream is its
rows of epoch 0, then of epoch 1, ...; its batch k is rows [kB, kB + B) of that stream, so batches
run across epoch ends without a short batch. With W DataLoader workers, worker w renders batches
k = w, w + W, ... (counted from where the run starts), and the DataLoader's round-robin hands them
back in stream order.

Resume: every batch carries its cursor [rank, rows of the stream consumed after it]. The module
reports trained batches through `mark_consumed`, the positions go into the Lightning checkpoint
(gathered from every rank), and a resumed run starts each rank's stream where it stopped: the next
batches are exactly those an uninterrupted run would have trained on.

Validation: `val_tasks`, a separate mixture of held-out conversations (test splits, or a slice the
training specs leave out). Rank r takes its rows r, r + world, ... in a fixed order, every time.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from llm.tasks import Task, build_mixture
from llm.data.loading import StageDataModule, batch_loader, gather_from_ranks, rank_and_world
from llm.tokenizer import Tokenizer

TaskSpec = str | dict[str, Any]


@lru_cache(maxsize=4)
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """Mixture positions in the order epoch `epoch` reads them (epoch 0: the mixture's own order)."""
    if epoch == 0:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_rows).astype(np.int64)


def render_row(tokenizer: Tokenizer, conversation: dict, seq_len: int) -> tuple[list[int], list[int], int]:
    """(inputs, targets, real length) of one conversation: inputs and targets exactly seq_len long, targets
    -1 where not learned; the length counts the inputs before padding."""
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=seq_len + 1)
    inputs = ids[:-1]
    targets = [t if learn else -1 for t, learn in zip(ids[1:], mask[1:])]
    pad = seq_len - len(inputs)
    return inputs + [tokenizer.bos_id] * pad, targets + [-1] * pad, len(inputs)


class ChatBatches(IterableDataset):
    """One rank's batches {"inputs", "targets": (B, T) int64, "cursor": [rank, rows consumed], "epoch"}.

    Training (`loop=True`): an endless stream over epochs, from row `start` of this rank's stream.
    Validation (`loop=False`): this rank's rows of one pass, in order, the last batch possibly short.
    """

    def __init__(self, mixture: Task, tokenizer_dir: str, batch_size: int, seq_len: int, rank: int,
                 world_size: int, seed: int, start: int = 0, loop: bool = True):
        self.mixture, self.tokenizer_dir = mixture, tokenizer_dir
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start, self.loop = start, loop
        self.rows_per_epoch = len(mixture) // world_size  # rows of one epoch on each rank
        if self.rows_per_epoch == 0:
            raise ValueError(f"the mixture has {len(mixture)} conversations, fewer than the {world_size} ranks: "
                             f"add data or use fewer devices")

    def mixture_index(self, position: int) -> int:
        """Which mixture row sits at `position` of this rank's stream."""
        epoch, i = divmod(position, self.rows_per_epoch)
        order = epoch_order(len(self.mixture), self.seed, epoch)
        return int(order[self.rank + i * self.world_size])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        tokenizer = Tokenizer.load(self.tokenizer_dir)
        end = None if self.loop else self.rows_per_epoch
        position = self.start + worker * self.batch_size
        while end is None or position < end:
            stop = position + self.batch_size if end is None else min(position + self.batch_size, end)
            yield self._batch(tokenizer, position, stop)
            position += num_workers * self.batch_size

    def _batch(self, tokenizer: Tokenizer, start: int, stop: int) -> dict:
        rows = [render_row(tokenizer, self.mixture[self.mixture_index(p)], self.seq_len) for p in range(start, stop)]
        inputs, targets, lengths = zip(*rows)
        return {"inputs": torch.tensor(inputs, dtype=torch.long),
                "targets": torch.tensor(targets, dtype=torch.long),
                "tokens": torch.tensor(sum(lengths), dtype=torch.long),  # real input tokens, padding left out
                "cursor": torch.tensor([self.rank, stop], dtype=torch.long),
                "epoch": torch.tensor(stop / self.rows_per_epoch, dtype=torch.float32)}


class ChatDataModule(StageDataModule):
    """tasks / val_tasks: mixture specs for llm.tasks.build_mixture (a task name, or a dict with "name",
    optional "weight", "split" and constructor kwargs). `size` sets the rows of a weighted mixture."""

    def __init__(self, tasks: list[TaskSpec], val_tasks: list[TaskSpec], tokenizer_dir: str, batch_size: int,
                 seq_len: int, size: int | None = None, seed: int = 42, num_workers: int = 1):
        super().__init__()
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"data.batch_size={batch_size} and data.seq_len={seq_len} must be positive")
        if not tasks:
            raise ValueError("data.tasks is empty: give the training mixture, e.g. data.tasks='[gsm8k,identity]'")
        if not val_tasks:
            raise ValueError("data.val_tasks is empty: give held-out conversations, e.g. "
                             "data.val_tasks='[{name:gsm8k,split:test,stop:200}]'")
        self.tokenizer_dir = str(tokenizer_dir)
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.num_workers = seed, num_workers
        # built now, so a bad spec or a missing file fails before any training starts
        self.train_mixture = build_mixture(list(tasks), split="train", seed=seed, size=size)
        self.val_mixture = build_mixture(list(val_tasks), split="test", seed=seed)
        self.rows_consumed = 0  # of this rank's training stream

    def epoch_length(self, world_size: int) -> int:
        """Conversations one pass over the training mixture uses on all ranks (each rank gets as many)."""
        return (len(self.train_mixture) // world_size) * world_size

    # ---- the two loaders -------------------------------------------------------------------

    def train_batches(self, rank: int = 0, world_size: int = 1, start: int = 0) -> ChatBatches:
        return ChatBatches(self.train_mixture, self.tokenizer_dir, self.batch_size, self.seq_len, rank, world_size,
                           self.seed, start=start, loop=True)

    def val_batches(self, rank: int = 0, world_size: int = 1) -> ChatBatches:
        return ChatBatches(self.val_mixture, self.tokenizer_dir, self.batch_size, self.seq_len, rank, world_size,
                           self.seed, loop=False)

    def train_dataloader(self) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        return batch_loader(self.train_batches(rank, world, start=self.rows_consumed), self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return batch_loader(self.val_batches(*rank_and_world(self.trainer)), 0)

    # ---- resumable position ----------------------------------------------------------------

    def mark_consumed(self, cursor: torch.Tensor) -> None:
        """Called by the training step for each batch it trained on."""
        self.rows_consumed = int(cursor[1])

    def state_dict(self) -> dict:
        mine = {"rows": self.rows_consumed}
        ranks = gather_from_ranks(mine)  # Lightning stores rank 0's copy only; resume needs every rank's
        return {"ranks": ranks, "mixture_rows": len(self.train_mixture), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        rank, world = rank_and_world(self.trainer)
        if len(state["ranks"]) != world:
            raise ValueError(f"the checkpoint's data position was saved with {len(state['ranks'])} ranks, this run "
                             f"has {world}: resume with the same trainer.devices, or start fresh with resume=false")
        if (state["mixture_rows"], state["seed"]) != (len(self.train_mixture), self.seed):
            raise ValueError(
                f"the training mixture changed since the checkpoint ({state['mixture_rows']} rows, seed "
                f"{state['seed']} then; {len(self.train_mixture)} rows, seed {self.seed} now): resume with the same "
                f"data.tasks, data.size and data.seed, or start fresh with resume=false")
        self.rows_consumed = state["ranks"][rank]["rows"]
