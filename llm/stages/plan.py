"""RunPlan: what one training run will do, decided once, before the Trainer exists.

A stage counts its batch in its own unit (the stage module's `batch_unit`):

    tokens    base: tokens per optimizer step; a micro-batch is per_device rows of seq_len tokens
    rows      mid / sft: conversations per step, each one padded row of seq_len positions
    prompts   rl: prompts per step; each becomes num_samples rows of at most seq_len positions

`make_plan` turns that batch, the micro-batch (rows or prompts per device), the world size and the
horizon (trainer.max_steps | stage.epochs | stage.target_param_data_ratio) into gradient accumulation,
total steps, validation and checkpoint intervals (in optimizer steps), and the tokens a step can hold.
It is pure: no Lightning, no config objects. llm.train builds the Trainer from `plan.trainer_kwargs()`,
prints `plan.table()` at the start of every run and stores `plan.to_dict()` in the artifact.

Tokens: `positions_per_step` is a step's capacity (exact for base; an upper bound for the padded chat
rows and the variable-length RL answers). What a stage really trained on — tokens that are not padding,
prompt and answer alike, masked or not, since the forward pass computes them all — is counted batch by
batch (the stage modules' training_step reports it) and is what train/tokens_per_sec, MFU and the
artifact's `tokens` measure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

UNITS = ("tokens", "rows", "prompts")


@dataclass(frozen=True)
class Horizon:
    """How long to train: the first that is set wins (max_steps, then epochs, then the ratio)."""
    max_steps: int | None = None  # trainer.max_steps (-1 or None: derive it)
    epochs: float | None = None  # passes over the training data (stages whose data has an end)
    tokens_per_param: float | None = None  # stage.target_param_data_ratio (nanochat: 20)


@dataclass(frozen=True)
class RunPlan:
    stage: str
    unit: str  # see the module docstring
    per_step: int  # the batch of one optimizer step, all ranks together, in `unit`
    per_device: int  # rows (or prompts) per device per micro-step
    seq_len: int
    world_size: int
    accumulation: int  # micro-steps per optimizer step
    total_steps: int
    horizon: str  # how total_steps was decided
    val_every: int  # optimizer steps between validations
    val_batches: int  # micro-batches per validation, per rank
    save_every: int  # optimizer steps between checkpoints/last.ckpt
    num_params: int
    positions_per_step: int  # tokens one step can hold (exact for base, an upper bound otherwise)
    flops_per_token: float  # training FLOPs per token (GPT.flops_per_token)
    learning_rates: dict[str, float]  # peak learning rate of every optimizer group
    peak_flops: float | None = None  # one device's peak matmul FLOP/s, for the wall-time estimate
    mfu: float = 0.4  # the model FLOPs utilisation the estimate assumes
    compile: bool = False  # torch.compile the model (decided by llm.train from the compile setting)

    @property
    def positions(self) -> int:
        return self.positions_per_step * self.total_steps

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.positions

    @property
    def estimated_seconds(self) -> float | None:
        """Wall time of the steps at `mfu` of every device's peak (None without a peak)."""
        return self.flops / (self.peak_flops * self.world_size * self.mfu) if self.peak_flops else None

    def trainer_kwargs(self) -> dict:
        """What the plan decides of the Lightning Trainer (intervals there count micro-batches)."""
        return dict(max_steps=self.total_steps, accumulate_grad_batches=self.accumulation,
                    val_check_interval=self.val_every * self.accumulation, limit_val_batches=self.val_batches,
                    check_val_every_n_epoch=None)

    def to_dict(self) -> dict:
        return {**asdict(self), "positions": self.positions, "flops": self.flops,
                "estimated_seconds": self.estimated_seconds}

    def table(self) -> str:
        """The short table every run prints first."""
        lrs = ", ".join(f"{name} {lr:.3g}" for name, lr in self.learning_rates.items())
        bound = "" if self.unit == "tokens" else "≤ "
        rows = [
            ("stage", self.stage),
            ("batch", f"{self.per_step:,} {self.unit}/step = {self.per_device} per device x {self.world_size} "
                      f"rank(s) x {self.accumulation} accumulation"),
            ("steps", f"{self.total_steps:,} ({self.horizon})"),
            ("tokens", f"{bound}{self.positions_per_step:,}/step, {bound}{self.positions:,} in all "
                       f"(context {self.seq_len})"),
            ("model", f"{self.num_params:,} parameters, {self.flops:.3g} training FLOPs"),
            ("time", self._time()),
            ("intervals", f"validate every {self.val_every} steps ({self.val_batches} batches/rank), "
                          f"checkpoint every {self.save_every}"),
            ("compile", "yes" if self.compile else "no (eager)"),
            ("learning rates", lrs),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


    def _time(self) -> str:
        if self.estimated_seconds is None:
            return "no estimate (no peak FLOP/s known for this device)"
        hours, rest = divmod(self.estimated_seconds, 3600)
        return (f"~{int(hours)}h{int(rest // 60):02d}m at {self.mfu:.0%} MFU of {self.world_size} x "
                f"{self.peak_flops / 1e12:.4g} TFLOP/s")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


def accumulation(unit: str, per_step: int, per_device: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimizer step; the batch must be a whole number of micro-steps on all ranks."""
    micro = per_device * world_size * (seq_len if unit == "tokens" else 1)
    if per_step % micro:
        what = "per_device x seq_len x ranks" if unit == "tokens" else "per_device x ranks"
        raise ValueError(f"stage.batch.per_step={per_step} {unit} is not a multiple of one micro-step on all ranks "
                         f"({micro} = {what}): set stage.batch.per_step to a multiple of {micro}")
    return per_step // micro


def total_steps(horizon: Horizon, positions_per_step: int, num_params: int,
                epoch_length: int | None, per_step: int) -> tuple[int, str]:
    """(steps, how they were decided). epoch_length: the training data's size in the batch unit (None for a stream)."""
    if horizon.max_steps is not None and horizon.max_steps != -1:
        if isinstance(horizon.max_steps, bool) or not isinstance(horizon.max_steps, int) or horizon.max_steps < 1:
            raise ValueError(f"trainer.max_steps={horizon.max_steps!r}: give a positive number of optimizer steps, "
                             f"or -1 to derive it from stage.epochs / stage.target_param_data_ratio")
        return horizon.max_steps, "trainer.max_steps"
    if horizon.epochs:
        if epoch_length is None:
            raise ValueError(f"stage.epochs={horizon.epochs} needs data with an end; this data is a stream: "
                             f"set trainer.max_steps instead")
        return max(1, math.ceil(horizon.epochs * epoch_length / per_step)), f"{horizon.epochs:g} epoch(s)"
    if horizon.tokens_per_param:
        steps = max(1, math.ceil(horizon.tokens_per_param * num_params / positions_per_step))
        return steps, f"{horizon.tokens_per_param:g} tokens/parameter"
    raise ValueError("the run has no length: set trainer.max_steps, stage.epochs or stage.target_param_data_ratio")


def make_plan(stage: str, unit: str, per_step: int, per_device: int, seq_len: int, world_size: int,
              horizon: Horizon, val_every: int, val_batches: int, save_every: int, num_params: int,
              flops_per_token: float, learning_rates: dict[str, float], epoch_length: int | None = None,
              rows_per_unit: int = 1, peak_flops: float | None = None, mfu: float = 0.4) -> RunPlan:
    """The plan of one run (see the module docstring). rows_per_unit: rows one prompt becomes (RL's samples)."""
    if unit not in UNITS:
        raise ValueError(f"batch unit {unit!r} is not one of {UNITS}")
    for name, value in (("stage.batch.per_step", per_step), ("stage.batch.per_device", per_device),
                        ("sequence_len", seq_len), ("world size", world_size), ("stage.val_every", val_every),
                        ("stage.val_batches", val_batches), ("stage.save_every", save_every)):
        _positive_int(name, value)
    accum = accumulation(unit, per_step, per_device, seq_len, world_size)
    positions = per_step if unit == "tokens" else per_step * rows_per_unit * seq_len
    steps, how = total_steps(horizon, positions, num_params, epoch_length, per_step)
    if not 0 < mfu <= 1:
        raise ValueError(f"estimate.mfu={mfu}: give the assumed utilisation as a fraction in (0, 1]")
    return RunPlan(stage, unit, per_step, per_device, seq_len, world_size, accum, steps, how, val_every,
                   val_batches, save_every, num_params, positions, float(flops_per_token), dict(learning_rates),
                   peak_flops, float(mfu))
