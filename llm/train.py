"""python -m llm.train stage=<base|mid|sft|rl> model=dNN trainer=<cpu|gpu|ddp|fsdp> [key=value ...]

Composes the run from conf/, builds the stage's LightningModule and LightningDataModule, trains
(resuming from <stage dir>/checkpoints/last.ckpt when one exists) and writes the stage's artifact.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import DoublePrecision
from omegaconf import DictConfig, OmegaConf

from llm import artifact
from llm.config import absolute, resolve_precision
from llm.model.gpt import GPT, GPTConfig
from llm.stages.checkpoint_io import AtomicCheckpointIO
from llm.stages.throughput import ThroughputMonitor
from llm.tokenizer import Tokenizer


def load_tokenizer(tokenizer_dir: str | Path) -> Tokenizer:
    folder = absolute(tokenizer_dir)
    if not (folder / "tokenizer.model").exists():
        raise FileNotFoundError(f"no tokenizer at {folder}: train one with `python -m llm.train_tokenizer` "
                                f"(same paths.artifacts), or set tokenizer_dir=<folder with tokenizer.model>")
    return Tokenizer.load(folder)


def stage_dir(cfg: DictConfig) -> Path:
    """<artifacts>/<stage>; a multirun job gets <artifacts>/<stage>_sweep/<sweep folder>/<job number>
    (its config.yaml records the job's overrides)."""
    root = absolute(cfg.paths.artifacts)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        hydra_cfg = HydraConfig.get()
        return root / f"{cfg.stage.name}_sweep" / Path(hydra_cfg.sweep.dir).name / str(hydra_cfg.job.num)
    return root / cfg.stage.name


def log_dir(cfg: DictConfig, folder: Path) -> Path:
    """Hydra's run folder when Hydra runs us, else the stage folder."""
    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else folder


def model_config(cfg: DictConfig, tokenizer: Tokenizer) -> GPTConfig:
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab_size != tokenizer.vocab_size:
        raise ValueError(f"model.vocab_size={vocab_size} but the tokenizer has {tokenizer.vocab_size} tokens: "
                         f"leave model.vocab_size=null to take the tokenizer's")
    return instantiate(cfg.model, vocab_size=vocab_size)


def initial_state(cfg: DictConfig, config: GPTConfig, tokenizer: Tokenizer) -> dict | None:
    """Weights of the artifact named by stage.init_from, after checking it fits this run."""
    if not cfg.stage.get("init_from"):
        return None
    folder = artifact.resolve_artifact(cfg.stage.init_from, absolute(cfg.paths.artifacts))
    artifact.check_init_compatible(folder, config, tokenizer)
    model, _, _ = artifact.load_artifact(folder)
    return model.state_dict()


def horizon(cfg: DictConfig, config: GPTConfig, tokens_per_step: int, steps_per_epoch: float | None = None) -> int:
    """trainer.max_steps, or stage.epochs passes over the data (when the data module can count its
    steps_per_epoch), or the steps that reach stage.target_param_data_ratio tokens per parameter."""
    if cfg.trainer.max_steps and cfg.trainer.max_steps > 0:
        return int(cfg.trainer.max_steps)
    epochs = cfg.stage.get("epochs")
    if epochs:
        if steps_per_epoch is None:
            raise ValueError(f"stage.epochs={epochs} needs a data module that knows its epoch length; set "
                             f"trainer.max_steps instead")
        return max(1, math.ceil(epochs * steps_per_epoch))
    ratio = cfg.stage.get("target_param_data_ratio")
    if not ratio:
        raise ValueError("set trainer.max_steps (or stage.target_param_data_ratio) to give the run a length")
    with torch.device("meta"):
        num_params = GPT(config).num_params()
    return max(1, math.ceil(ratio * num_params / tokens_per_step))


def accumulation(total_batch_tokens: int, micro_tokens: int) -> int:
    if total_batch_tokens % micro_tokens:
        raise ValueError(
            f"stage.total_batch_tokens={total_batch_tokens} is not a multiple of the tokens one micro-step "
            f"processes on all ranks ({micro_tokens} = data.batch_size x sequence_len x world size): "
            f"set stage.total_batch_tokens to a multiple of {micro_tokens}")
    return total_batch_tokens // micro_tokens


def build_trainer(cfg: DictConfig, folder: Path, callbacks: list) -> L.Trainer:
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    logger = TensorBoardLogger(save_dir=str(log_dir(cfg, folder)), name="tensorboard", version="")
    plugins = [AtomicCheckpointIO()]
    if precision == "64-true":
        # float64 reference runs (the equivalence tests): ModelParallelStrategy refuses the precision
        # flag but runs the plugin, which turns the model to float64 before FSDP2 shards it
        plugins.append(DoublePrecision())
        precision = None
    make_trainer = instantiate(cfg.trainer, _partial_=True, _convert_="all")
    return make_trainer(precision=precision, logger=logger, callbacks=callbacks,
                        plugins=plugins, check_val_every_n_epoch=None)


def run(cfg: DictConfig) -> dict:
    """Train one stage; returns the metrics written to its metrics.json."""
    L.seed_everything(cfg.seed, workers=True)
    started = time.time()
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    config = model_config(cfg, tokenizer)
    folder = stage_dir(cfg)
    datamodule = instantiate(cfg.data, tokenizer_dir=str(absolute(cfg.tokenizer_dir)), _convert_="all")

    last_ckpt = folder / "checkpoints" / "last.ckpt"
    checkpointing = ModelCheckpoint(dirpath=last_ckpt.parent, save_top_k=0, save_last=True,
                                    every_n_train_steps=int(cfg.stage.save_every))
    throughput = ThroughputMonitor(tokens_per_step=int(cfg.stage.total_batch_tokens))
    trainer = build_trainer(cfg, folder, [checkpointing, throughput])
    micro_tokens = datamodule.batch_size * datamodule.seq_len * trainer.world_size
    accum = accumulation(int(cfg.stage.total_batch_tokens), micro_tokens)
    epoch_steps = getattr(datamodule, "steps_per_epoch", None)
    total_steps = horizon(cfg, config, int(cfg.stage.total_batch_tokens),
                          epoch_steps(trainer.world_size, accum) if epoch_steps else None)
    trainer.accumulate_grad_batches = accum
    trainer.fit_loop.epoch_loop.max_steps = total_steps
    trainer.val_check_interval = int(cfg.stage.val_every) * accum
    trainer.limit_val_batches = int(cfg.stage.val_batches)

    make_module = instantiate(cfg.stage.module, _partial_=True, _convert_="all")
    module = make_module(model_config=config, optimizer=instantiate(cfg.optimizer, _convert_="all"),
                         tokenizer=tokenizer, total_steps=total_steps, compile=bool(cfg.compile),
                         init_state=initial_state(cfg, config, tokenizer))

    resume_from = str(last_ckpt) if cfg.resume and last_ckpt.exists() else None
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    trainer.save_checkpoint(last_ckpt)
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    state = module.full_state_dict()  # every rank: a collective under FSDP
    metrics = {
        "stage": cfg.stage.name, "steps": trainer.global_step, "total_steps": total_steps,
        "tokens": trainer.global_step * int(cfg.stage.total_batch_tokens),
        "train_loss": train_loss,
        **{k.replace("/", "_"): float(v) for k, v in final.items()},
        **getattr(module, "final_metrics", dict)(),  # a stage's own headline numbers (RL: reward before/after)
        "num_params": module.model.num_params(), "wall_time_s": time.time() - started,
        "world_size": trainer.world_size, "tensorboard_dir": str(trainer.logger.log_dir),
    }
    if trainer.is_global_zero:
        extra = {"init_from": cfg.stage.get("init_from"), "config": OmegaConf.to_container(cfg, resolve=True),
                 "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []}
        artifact.save_artifact(folder, state, config, tokenizer, cfg.stage.name, metrics, extra)
        print(f"{cfg.stage.name} artifact: {folder}  " + "  ".join(
            f"{k}={metrics[k]:.4f}" for k in ("train_loss", "val_bpb") if k in metrics))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
