"""Which examples each rank evaluates.

Examples are cut into fixed batches first (batch i = examples [i*B, (i+1)*B)), then rank r takes
batches r, r + W, r + 2W, ... . Every batch is the same set of rows whatever the number of ranks,
so every forward pass, and so every score, is bit-identical to the one-process run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch.distributed as dist
from tqdm import tqdm


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where the score counters live: the collective that sums them runs there (NCCL: cuda)

    def __post_init__(self):
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")

    @classmethod
    def current(cls) -> "Shard":
        """This process's place in the initialised process group (rank 0 of 1 without one)."""
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, num_examples: int, batch_size: int) -> list[range]:
        """This rank's batches of example indices."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        starts = range(0, num_examples, batch_size)
        return [range(s, min(s + batch_size, num_examples)) for s in starts[self.rank::self.world_size]]

    def items(self, num_examples: int) -> Iterator[int]:
        """This rank's examples when each example is its own batch."""
        return iter(range(self.rank, num_examples, self.world_size))

    def progress(self, batches: Iterable, desc: str, enabled: bool = True) -> Iterable:
        """A progress bar over this rank's batches, drawn by rank 0 only (the others keep pace)."""
        return tqdm(batches, desc=desc, disable=not (enabled and self.is_main), leave=False, dynamic_ncols=True)
