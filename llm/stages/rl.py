"""RLModule: policy gradient on verifiable rewards (stage=rl), nanochat's simplified GRPO.

Every training step, on this rank's batch of prompts (llm.data.rl.RLDataModule):
  1. roll out: the Generator samples num_samples answers per prompt on the KV cache (each prompt is
     prefilled once for all its samples) and runs the calculator for tool calls, forcing its output in;
  2. score: reward = the task's reward(conversation, answer text) for every sample;
  3. advantage = reward - the mean reward of the prompt's group. No division by the group's std, no KL
     penalty, no PPO ratio clipping: the samples come from the very weights being updated (on-policy);
  4. loss = -sum(advantage * log p(token)) over the tokens the policy sampled, divided by how many there
     are. Prompt tokens and the tool's forced output were not the policy's choice: they get no gradient.
A group whose samples all scored the same has zero advantage and teaches nothing; its share is logged
(train/equal_groups): near 1 means the task is too easy or too hard for the model.

Held-out evaluation runs as the validation loop (every stage.val_every steps, at the end, and once
before the first step): eval_samples answers per prompt of the held-out slice, with the same fixed
seeds every time, so successive evaluations differ only by the weights. It logs val/reward, val/pass@1
(share of samples solved) and val/pass@k (share of prompts solved by at least one of k samples); a
sample is solved when its reward reaches 1 (full credit). The artifact's metrics.json gets
reward_before / reward_after, and gsm8k_pass1_before / gsm8k_pass1_after when the held-out task is
GSM8K, for the report card.

Everything else is StageModule's (llm/stages/common.py): optimizer (the RL learning rates come from
optimizer.lr_scale, set in conf/stage/rl.yaml), schedule, checkpoints, resume and the artifact.
Tokens trained (train/tokens_per_sec, MFU) are the real tokens of the policy rows that go through
forward and backward: prompt and answer, without padding. Under DDP each rank rolls out its own
prompts on the unwrapped model (no collective happens while generating), DDP averages the gradients,
and rewards are gathered from every rank for logging. FSDP is refused: generating on sharded weights needs every rank in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torchmetrics import MeanMetric

from llm.generate.engine import Generator, generate_answers
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.data.rl import RLDataModule
from llm.stages.common import StageModule
from llm.conversation import Conversation
from llm.tokenizer import Tokenizer

SOLVED = 1.0  # a sample counts as solved (pass@k) when its reward reaches full credit


@dataclass
class Rollouts:
    """num_samples answers to each of P prompts: row p * num_samples + s is sample s of prompt p."""
    prompts: list[list[int]]
    completions: list[list[int]]  # generated ids, tool outputs included, a final assistant_end too
    forced: list[list[bool]]      # True where the tool, not the policy, wrote the token
    num_samples: int

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completions)


def sample_rollouts(generator: Generator, prompts: Sequence[list[int]], sampling: Sampling) -> Rollouts:
    """sampling.num_samples answers per prompt, each within the context (llm.generate.engine.generate_answers:
    a prompt filling the context gets empty answers); the same seed gives the same rollouts."""
    answers = [a for per_prompt in generate_answers(generator, prompts, sampling) for a in per_prompt]
    return Rollouts([list(p) for p in prompts], [ids for ids, _ in answers], [f for _, f in answers],
                    sampling.num_samples)


def score_rollouts(tokenizer: Tokenizer, rollouts: Rollouts, conversations: Sequence[Conversation],
                   reward: Callable[[Conversation, str], float]) -> torch.Tensor:
    """(P, num_samples) rewards of the answers, each read as display text (tool calls as <<expr=result>>)."""
    n = rollouts.num_samples
    values = [reward(conversations[r // n], completion_text(tokenizer, ids))
              for r, ids in enumerate(rollouts.completions)]
    return torch.tensor(values, dtype=torch.float32).view(len(conversations), n)


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(P, S) rewards -> reward minus its group's mean (no std normalisation)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def policy_rows(rollouts: Rollouts, pad_id: int, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (R, T): row r is prompt + completion shifted by one; a target is -1 unless
    the policy sampled that token (prompt tokens, forced tool output and padding are -1). With max_len, a
    row keeps its last max_len + 1 tokens: only a prompt that filled the context (no answer) is cut."""
    n = rollouts.num_samples
    rows = []
    for r, (ids, forced) in enumerate(zip(rollouts.completions, rollouts.forced)):
        prompt = rollouts.prompts[r // n]
        sequence = prompt + ids
        learn = [False] * len(prompt) + [not f for f in forced]
        if max_len is not None:
            sequence, learn = sequence[-(max_len + 1):], learn[-(max_len + 1):]
        rows.append((sequence[:-1], [t if ok else -1 for t, ok in zip(sequence[1:], learn[1:])]))
    width = max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        inputs[r, :len(x)] = torch.tensor(x)
        targets[r, :len(y)] = torch.tensor(y)
    return inputs, targets


def forwarded_rows(advantages: torch.Tensor) -> torch.Tensor:
    """Indices of the rows the loss runs: rows with zero advantage contribute exactly nothing, so they skip
    the forward pass; one row always runs, so every parameter is in the graph (DDP needs that)."""
    keep = (advantages != 0).nonzero().flatten()
    return keep if keep.numel() else keep.new_zeros(1)


def row_lengths(rollouts: Rollouts, max_len: int) -> list[int]:
    """Real input tokens of each policy row (prompt + answer, cut to the context; padding left out)."""
    n = rollouts.num_samples
    return [min(len(rollouts.prompts[r // n]) + len(c), max_len + 1) - 1 for r, c in enumerate(rollouts.completions)]


def policy_gradient_loss(forward: Callable[..., torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                         advantages: torch.Tensor) -> torch.Tensor:
    """-sum(advantage * log p(sampled token)) / number of sampled tokens, over all R rows (the rows of
    forwarded_rows run; the others still count in the normaliser)."""
    num_tokens = (targets != -1).sum().clamp(min=1)
    keep = forwarded_rows(advantages)
    kept = targets[keep]
    # sum of advantage * -log p over sampled tokens, through the fused output-layer loss
    weighted = forward(inputs[keep], targets=kept, reduction="sum", loss_weights=advantages[keep, None].expand_as(kept))
    return weighted / num_tokens


def batch_seed(seed: int, purpose: int, rank: int, position: int) -> int:
    """A sampling seed for one batch: fixed by (run seed, train/eval, rank, position in the rank's stream)."""
    return int(np.random.SeedSequence([seed, purpose, rank, position]).generate_state(1)[0]) % 2**31


class RLModule(StageModule):
    batch_unit = "prompts"

    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer, total_steps: int,
                 sampling: Sampling, eval_samples: int, seed: int, **shared):
        """sampling: how rollouts sample (num_samples answers per prompt: the group); eval_samples: answers
        per held-out prompt (val/pass@k, k = this); seed: fixes every batch's sampling seeds."""
        super().__init__(model_config, optimizer, tokenizer, total_steps, **shared)
        self.rollout_settings = sampling
        self.eval_settings = replace(sampling, num_samples=eval_samples)
        self.seed = seed
        self.hparams.update(sampling=vars(sampling), eval_samples=eval_samples, seed=seed)
        self.reward: Callable[[Conversation, str], float] | None = None  # the data's, given by connect()
        self.val_task_names: set[str] = set()
        self.val_reward, self.val_pass1, self.val_passk = MeanMetric(), MeanMetric(), MeanMetric()
        self.before: dict[str, float] | None = None  # the held-out evaluation before the first step
        self.last_eval: dict[str, float] | None = None
        self._generator: Generator | None = None

    @classmethod
    def rows_per_unit(cls, module_settings: dict) -> int:
        return int(module_settings["sampling"]["num_samples"])

    def connect(self, datamodule: RLDataModule) -> None:
        if not isinstance(datamodule, RLDataModule):
            raise TypeError(f"stage=rl needs an RL prompt data module (data=rl_gsm8k or rl_arith), got "
                            f"{type(datamodule).__name__}")
        super().connect(datamodule)
        self.reward, self.val_task_names = datamodule.reward, datamodule.val_task_names

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise ValueError("stage=rl cannot run under trainer=fsdp: generating rollouts on sharded weights would "
                             "need every rank in lockstep; use trainer=ddp (or cpu / gpu)")
        super().configure_model()

    # ---- rollouts ---------------------------------------------------------------------------

    @property
    def generator(self) -> Generator:
        if self._generator is None:  # the plain model: under DDP no collective may run while generating
            self._generator = Generator(self.model, self.tokenizer)
        return self._generator

    @torch.no_grad()
    def roll_out(self, batch: dict, settings: Sampling, purpose: int) -> tuple[Rollouts, torch.Tensor]:
        """(rollouts, (P, S) rewards) for the batch's prompts, with seeds fixed by its place in the stream."""
        was_training = self.model.training
        generator = self.generator
        self.model.eval()
        rank, position = batch["position"].tolist()
        seed = batch_seed(self.seed, purpose, rank, position)
        rollouts = sample_rollouts(generator, batch["prompts"], replace(settings, seed=seed))
        self.model.train(was_training)
        rewards = score_rollouts(self.tokenizer, rollouts, batch["conversations"], self.reward)
        return rollouts, rewards.to(self.device)

    # ---- training ---------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        started = time.perf_counter()
        rollouts, rewards = self.roll_out(batch, self.rollout_settings, purpose=0)
        rollout_s = time.perf_counter() - started
        max_len = self.model_config.sequence_len
        inputs, targets = policy_rows(rollouts, pad_id=self.tokenizer.bos_id, max_len=max_len)
        advantages = group_advantages(rewards).flatten()
        loss = policy_gradient_loss(self._forward, inputs.to(self.device), targets.to(self.device), advantages)
        lengths = row_lengths(rollouts, max_len)
        tokens = sum(lengths[r] for r in forwarded_rows(advantages).tolist())
        self.report_consumed(batch)
        self._log_rollouts(batch, rollouts, rewards, rollout_s)
        self.log("train/loss", loss, batch_size=len(rollouts.completions))
        return {"loss": loss, "tokens": tokens}

    def _log_rollouts(self, batch: dict, rollouts: Rollouts, rewards: torch.Tensor, rollout_s: float) -> None:
        """Batch statistics over every rank's rollouts (gathered, so each rank logs the same numbers)."""
        lengths = torch.tensor([len(c) for c in rollouts.completions], dtype=torch.float32, device=self.device)
        everyone = self.all_gather({"rewards": rewards, "lengths": lengths, "index": batch["index"].to(self.device)})
        rewards, lengths = everyone["rewards"].reshape(-1, rewards.size(1)), everyone["lengths"].flatten()
        equal = (rewards == rewards[:, :1]).all(dim=1)
        size = rewards.numel()
        self.log("train/reward", rewards.mean(), prog_bar=True, batch_size=size)
        self.log_dict({
            "train/pass@1": (rewards >= SOLVED).float().mean(),
            "train/equal_groups": equal.float().mean(), "train/completion_tokens": lengths.mean(),
            "train/completion_tokens_max": lengths.max(),
            "train/distinct_prompts": float(everyone["index"].unique().numel()),  # disjoint shards: all of them
            "train/rollout_tokens_per_sec": rollouts.num_tokens / max(rollout_s, 1e-9),
            "train/epoch": batch["epoch"].float(),
        }, batch_size=size)

    # ---- held-out evaluation ----------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, rewards = self.roll_out(batch, self.eval_settings, purpose=1)
        solved = (rewards >= SOLVED).float()
        self.val_reward.update(rewards.flatten())
        self.val_pass1.update(solved.mean(dim=1))
        self.val_passk.update(solved.amax(dim=1))

    def _finish_eval(self) -> dict[str, float]:
        """The held-out numbers over every rank (torchmetrics syncs them), then reset for the next pass."""
        k = self.eval_settings.num_samples
        values = {"reward": self.val_reward, "pass@1": self.val_pass1, f"pass@{k}": self.val_passk}
        out = {name: float(metric.compute()) for name, metric in values.items()}
        for metric in values.values():
            metric.reset()
        return out

    def on_validation_epoch_end(self) -> None:
        self.last_eval = self._finish_eval()
        for name, value in self.last_eval.items():  # equal on every rank already; sync_dist only keeps Lightning quiet
            self.log(f"val/{name}", value, prog_bar=name == "reward", sync_dist=True)

    def on_train_start(self) -> None:
        """Evaluate the starting policy once, so the logs and the artifact have the 'before' numbers."""
        if self.before is not None:  # resumed: measured by the first run
            return
        trainer = self.trainer
        limit = trainer.limit_val_batches if isinstance(trainer.limit_val_batches, int) else None
        with torch.no_grad():
            for i, batch in enumerate(self._data.val_dataloader()):
                if limit is not None and i >= limit:
                    break
                self.validation_step(batch, i)
        self.before = self._finish_eval()
        if trainer.is_global_zero and self.logger is not None:
            self.logger.log_metrics({f"val/{k}": v for k, v in self.before.items()}, step=0)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rl_before"] = self.before

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.before = checkpoint.get("rl_before")

    def final_metrics(self) -> dict[str, float]:
        """Headline numbers for the artifact's metrics.json (the report card's RL rows)."""
        out = {}
        for when, numbers in (("before", self.before), ("after", self.last_eval)):
            if numbers is None:
                continue
            out[f"reward_{when}"] = numbers["reward"]
            if self.val_task_names == {"gsm8k"}:
                out[f"gsm8k_pass1_{when}"] = numbers["pass@1"]
        return out
