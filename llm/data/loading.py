"""What the data modules share: the StageDataModule contract, which rank this is, a DataLoader over
pre-batched streams, and collecting every rank's resume position (Lightning checkpoints only rank 0's
state)."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset


class StageDataModule(L.LightningDataModule):
    """What llm.train and the stage modules rely on of a data module.

    Every training batch is a dict with a "cursor" (opaque: only the data module reads it) that the stage
    hands back through mark_consumed() once it trained on the batch; state_dict() then holds every rank's
    position, so a resumed run continues with exactly the batches an uninterrupted one would have seen.
    batch_size and seq_len are the micro-batch (rows per device) and the row length.
    """

    batch_size: int
    seq_len: int

    def mark_consumed(self, cursor: torch.Tensor) -> None:
        raise NotImplementedError

    def epoch_length(self, world_size: int) -> int | None:
        """Rows (conversations, prompts) one pass over the training data uses on all ranks; None for a stream."""
        return None


def rank_and_world(trainer) -> tuple[int, int]:
    return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)


def batch_loader(batches: IterableDataset, num_workers: int) -> DataLoader:
    """The datasets yield whole batches already, so the loader only moves them (and prefetches)."""
    return DataLoader(batches, batch_size=None, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)


def gather_from_ranks(mine: dict) -> list[dict]:
    """Every rank's `mine`, in rank order (a collective when distributed: call it on every rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    return ranks
