"""PretrainModule: next-token prediction on packed text (stage=base).

What every stage shares (optimizer and schedule, FSDP2, compile, the artifact) is StageModule's
(llm/stages/common.py). Here: the packed-row loss, validation bits per byte, and greedy samples of a
few prompts every sample_every steps, printed and logged.
"""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from llm.evaluate.bpb import BitsPerByte
from llm.model.gpt import GPTConfig
from llm.optim.groups import OptimizerConfig
from llm.stages.common import StageModule
from llm.tokenizer import Tokenizer


class PretrainModule(StageModule):
    batch_unit = "tokens"

    def __init__(self, model_config: GPTConfig, optimizer: OptimizerConfig, tokenizer: Tokenizer, total_steps: int,
                 sample_every: int, sample_max_tokens: int, sample_prompts: list[str], **shared):
        """sample_every: optimizer steps between sample generations (0: none); shared: StageModule's settings."""
        super().__init__(model_config, optimizer, tokenizer, total_steps, **shared)
        self.sample_every, self.sample_max_tokens = sample_every, sample_max_tokens
        self.sample_prompts = list(sample_prompts)
        self.val_bpb = BitsPerByte(tokenizer.token_bytes())

    # ---- steps ----------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        tokens = batch["tokens"]
        loss = self._forward(tokens[:, :-1], targets=tokens[:, 1:])
        self.report_consumed(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=tokens.size(0))
        return {"loss": loss, "tokens": tokens[:, :-1].numel()}  # packed rows: no padding

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
            for logger in self.loggers:  # text panels exist in TensorBoard; other loggers get the printout
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("samples", "\n\n".join(texts), self.global_step)
