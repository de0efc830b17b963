"""PretrainModule: next-token prediction on packed text (stage=base).

The plumbing every stage shares lives here too: the optimizer (Muon + AdamW) and its
warmup -> constant -> warmdown schedule, FSDP2 sharding per block, torch.compile, validation
bits-per-byte and the artifact's state dict. The chat and RL stages subclass this module and change
only what a batch is and what the loss counts.
"""

from __future__ import annotations

import torch
import lightning as L

from llm.evaluate.bpb import BitsPerByte
from llm.model.gpt import GPT, GPTConfig
from llm.optim.groups import OptimizerConfig, build_optimizer
from llm.optim.schedule import apply_schedule, validate_schedule
from llm.tokenizer import Tokenizer


class PretrainModule(L.LightningModule):
    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer,
                 total_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2,
                 final_lr_frac: float = 0.0, compile: bool = False, init_state: dict | None = None,
                 sample_every: int = 0, sample_max_tokens: int = 16, sample_prompts: list[str] = ()):
        super().__init__()
        validate_schedule(total_steps, warmup_ratio, warmdown_ratio, final_lr_frac)
        self.model_config, self.optimizer_config = model_config, optimizer
        self.tokenizer = tokenizer
        self.total_steps = total_steps
        self.schedule = dict(warmup_ratio=warmup_ratio, warmdown_ratio=warmdown_ratio, final_lr_frac=final_lr_frac)
        self.compile = compile
        self.sample_every, self.sample_max_tokens = sample_every, sample_max_tokens
        self.sample_prompts = list(sample_prompts)
        self.model = GPT(model_config)
        if init_state is not None:  # continuing from an earlier stage's artifact
            self.model.load_state_dict(init_state, strict=not model_config.tie_embeddings)
        self.val_bpb = BitsPerByte(tokenizer.token_bytes())
        self._forward = self.model  # replaced by the compiled model in configure_model
        self.save_hyperparameters({"model": vars(model_config), "optimizer": vars(optimizer),
                                   "total_steps": total_steps, **self.schedule})

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

    # ---- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self):
        return build_optimizer(self.model, self.optimizer_config)

    def on_before_optimizer_step(self, optimizer) -> None:
        multiplier = apply_schedule(optimizer, self.global_step, self.total_steps, **self.schedule,
                                    momentum=self.optimizer_config)
        lrs = {f"lr/{group.get('name', i)}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
        self.log_dict({"train/lr_multiplier": multiplier, **lrs}, rank_zero_only=True)

    # ---- steps ----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        tokens = batch["tokens"]
        loss = self._forward(tokens[:, :-1], targets=tokens[:, 1:])
        self._report_consumed(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens.size(0))
        return loss

    def _report_consumed(self, batch: dict) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "mark_consumed"):
            datamodule.mark_consumed(batch["cursor"])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        tokens = batch["tokens"]
        targets = tokens[:, 1:]
        losses = self._forward(tokens[:, :-1], targets=targets, reduction="none")
        self.val_bpb.update(losses, targets)
        self.log("val/loss", losses.mean(), sync_dist=True, batch_size=tokens.size(0))
        self.log("val/bpb", self.val_bpb, prog_bar=True, batch_size=tokens.size(0))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step
        if self.sample_every and self.sample_prompts and step % self.sample_every == 0 and step > 0 \
                and self._last_sampled != step:
            self._last_sampled = step
            self.log_samples()

    _last_sampled = -1

    @torch.no_grad()
    def log_samples(self) -> None:
        """Greedy continuations of the sample prompts, printed and logged to TensorBoard."""
        if self.device_mesh is not None:
            return  # sharded parameters: sampling needs every rank in lockstep; skipped under FSDP
        from llm.generate.engine import Generator
        prompts = [self.tokenizer.encode(p, prepend_bos=True) for p in self.sample_prompts]
        was_training = self.model.training
        self.model.eval()
        rows = Generator(self.model, self.tokenizer).generate_batch(
            prompts, max_tokens=self.sample_max_tokens, temperature=0.0)
        self.model.train(was_training)
        texts = [p + self.tokenizer.decode(row[0]) for p, row in zip(self.sample_prompts, rows)]
        if self.global_rank == 0:
            for text in texts:
                print(f"[step {self.global_step}] {text!r}")
            experiment = getattr(self.logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("samples", "\n\n".join(texts), self.global_step)

    # ---- the artifact ---------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's full weights on CPU; a collective under FSDP, so call it on every rank."""
        if self.device_mesh is None:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
