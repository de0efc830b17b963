"""RLDataModule: prompts of reward-bearing tasks for the RL stage, rank-sharded, seeded and resumable.

A batch is B prompts, not rendered rows: the RL module samples the answers itself. Everything else is
ChatDataModule's, reused as is: the task mixture (llm.tasks.build_mixture specs), the fixed-seed order
of every epoch, row i of an epoch going to rank i % world_size (ranks never share a prompt), the
cursor every batch carries and the per-rank position saved in the Lightning checkpoint, so a resumed
run continues with exactly the prompts an uninterrupted one would have seen.

Each batch: {"prompts": B lists of token ids (the conversation up to <|assistant_start|>),
             "conversations": the B reference conversations (what `reward` checks answers against),
             "index": (B,) mixture rows, "cursor" (for resume), "position": [rank, prompts of the rank's
             stream up to this batch's end] (fixes the batch's sampling seeds), "epoch": passes so far}.

`reward(conversation, completion)` finds the conversation's task by the name it is tagged with and
asks that task; every task named in `tasks` and `val_tasks` must implement Task.reward (checked here,
before any training starts).
"""

from __future__ import annotations

import warnings

import torch

from llm.data.chat import ChatBatches, ChatDataModule
from llm.tasks import Task
from llm.conversation import Conversation
from llm.tokenizer import Tokenizer


# The held-out stream has an exact length (PromptBatches.__len__, read in the main process); Lightning warns
# about any IterableDataset with a length because worker sharding could make it wrong.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class PromptBatches(ChatBatches):
    """ChatBatches whose batches are prompts to complete instead of (inputs, targets) rows."""

    def __len__(self) -> int:
        """Batches of one held-out pass (progress bars show it); the training stream has no end."""
        if self.loop:
            raise TypeError("the training prompt stream is endless")
        return -(-self.rows_per_epoch // self.batch_size)

    def _batch(self, tokenizer: Tokenizer, start: int, stop: int) -> dict:
        index = [self.mixture_index(p) for p in range(start, stop)]
        conversations = [self.mixture[i] for i in index]
        return {"prompts": [tokenizer.render_for_completion(c) for c in conversations],
                "conversations": conversations,
                "index": torch.tensor(index, dtype=torch.long),
                "cursor": torch.tensor([self.rank, stop], dtype=torch.long),
                "position": torch.tensor([self.rank, stop], dtype=torch.long),  # seeds the batch's rollouts
                "epoch": torch.tensor(stop / self.rows_per_epoch, dtype=torch.float64)}


class RLDataModule(ChatDataModule):
    """tasks: the training prompts (mixture specs, split train); val_tasks: the held-out slice evaluated
    every stage.val_every steps (default split test). batch_size: prompts per device per micro-step;
    seq_len: the longest row (prompt + answer) the model takes."""

    def __init__(self, *args, num_workers: int = 0, **kwargs):
        super().__init__(*args, num_workers=num_workers, **kwargs)
        self.rewarders: dict[str, Task] = {}
        for task in [*self.train_mixture.tasks, *self.val_mixture.tasks]:
            if type(task).reward is Task.reward:
                task.reward({}, "")  # raises the task's own message, which names the RL-capable tasks
            self.rewarders.setdefault(task.name, task)

    @property
    def val_task_names(self) -> set[str]:
        return {task.name for task in self.val_mixture.tasks}

    def reward(self, conversation: Conversation, completion: str) -> float:
        """The reward of `completion` (display text) as an answer to `conversation`."""
        return float(self.rewarders[conversation["task"]].reward(conversation, completion))

    def train_batches(self, rank: int = 0, world_size: int = 1, start: int = 0) -> PromptBatches:
        return PromptBatches(self.train_mixture, self.tokenizer_dir, self.batch_size, self.seq_len, rank,
                             world_size, self.seed, start=start, loop=True)

    def val_batches(self, rank: int = 0, world_size: int = 1) -> PromptBatches:
        return PromptBatches(self.val_mixture, self.tokenizer_dir, self.batch_size, self.seq_len, rank,
                             world_size, self.seed, loop=False)
