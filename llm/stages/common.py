"""StageModule: what every training stage shares, and the hooks through which llm.train talks to it.

Shared: the model (from scratch, or from an earlier stage's weights handed in as init_state), the
optimizer (Muon + AdamW, llm.optim.groups; every learning-rate scaling happens there) and its
warmup -> constant -> warmdown schedule with the learning rates logged per group, FSDP2 sharding per
block, torch.compile, and the artifact's full state dict.

The contract with llm.train and the data modules (llm.data.loading.StageDataModule):
    batch_unit            class attribute: what the stage's batch counts ("tokens", "rows", "prompts";
                          llm.stages.plan); rows_per_unit(): rows one unit becomes
    connect(datamodule)   called once before fit: a stage takes what it needs of its data (RL: the reward)
    training_step         returns {"loss", "tokens"}: tokens = real tokens the step trained on (no padding),
                          which ThroughputMonitor turns into tokens/s and MFU
    report_consumed(batch)  hands a trained batch's cursor back to the data module (exact resume)
    final_metrics()       the stage's own headline numbers for metrics.json ({} unless overridden)
"""

from __future__ import annotations

import lightning as L
import torch

from llm.data.loading import StageDataModule
from llm.model.gpt import GPT, GPTConfig
from llm.optim.groups import OptimizerConfig, build_optimizer
from llm.optim.schedule import apply_schedule, validate_schedule
from llm.tokenizer import Tokenizer


class StageModule(L.LightningModule):
    batch_unit = "tokens"

    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer, total_steps: int,
                 warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float, compile: bool = False,
                 init_state: dict | None = None):
        super().__init__()
        validate_schedule(total_steps, warmup_ratio, warmdown_ratio, final_lr_frac)
        self.model_config, self.optimizer_config = model_config, optimizer
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.schedule = dict(warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
        self.compile = compile
        self.model = GPT(model_config)
        if init_state is not None:  # continuing from an earlier stage's artifact
            self.model.load_state_dict(init_state, strict=not model_config.tie_embeddings)
        self._forward = self.model  # replaced by the compiled model in configure_model
        self._data: StageDataModule | None = None
        self.save_hyperparameters({"model": vars(model_config), "optimizer": vars(optimizer),
                                   "total_steps": total_steps, **self.schedule})

    @classmethod
    def rows_per_unit(cls, module_settings: dict) -> int:
        """Model rows one unit of the batch becomes (RL: a prompt becomes num_samples rows)."""
        return 1

    def connect(self, datamodule: StageDataModule) -> None:
        self._data = datamodule

    def report_consumed(self, batch: dict) -> None:
        if self._data is not None:
            self._data.mark_consumed(batch["cursor"])

    def final_metrics(self) -> dict[str, float]:
        return {}

    # ---- parallelism and compilation ------------------------------------------------------

    def configure_model(self) -> None:
        """Shard each block and the root with FSDP2 when the strategy gives a device mesh."""
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            from torch.distributed.fsdp import fully_shard
            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self._sharded = True
        if self.compile and self._forward is self.model:
            # kept off the module tree, so state_dict keys stay free of `_orig_mod.`
            object.__setattr__(self, "_forward", torch.compile(self.model))
            self.model.cpu_loss_kernel = True

    # ---- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_config)

    def on_before_optimizer_step(self, optimizer) -> None:
        multiplier = apply_schedule(optimizer, self.global_step, self.total_steps, **self.schedule,
                                    momentum=self.optimizer_config)
        lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
        self.log_dict({"train/lr_multiplier": multiplier, **lrs}, rank_zero_only=True)

    # ---- the artifact ---------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights on CPU; a collective under FSDP, so call it on every rank."""
        if self.device_mesh is None:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
