"""python -m llm.train stage=<base|mid|sft|rl> model=dNN trainer=<cpu|gpu|ddp|fsdp> [key=value ...]

Composes the run from conf/ and then, in this order: the tokenizer and the model's shape, the stage's
data module, the run plan (llm/stages/plan.py: batch, accumulation, steps, intervals, learning rates —
printed first, `plan_only=true` prints it and exits), the Trainer built from the plan in one call, the
stage's module (from an earlier stage's weights when stage.init_from names one). Then it trains,
resuming from <stage dir>/checkpoints/last.ckpt when one exists, and writes the stage's artifact with
the plan in its config.yaml and metrics.json.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins import DoublePrecision
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from llm import artifact
from llm.config import absolute, quiet_libraries, resolve_precision, runs_on_cpu, world_size
from llm.data.loading import StageDataModule
from llm.errors import one_line_errors
from llm.model.gpt import GPT, GPTConfig
from llm.optim.groups import OptimizerConfig, build_param_groups
from llm.stages.checkpoint_io import AtomicCheckpointIO, resumable_checkpoint
from llm.stages.common import StageModule
from llm.stages.host_memory import keep_freed_memory
from llm.stages.plan import Horizon, RunPlan, make_plan
from llm.stages.throughput import ThroughputMonitor, peak_flops
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


def model_config(cfg: DictConfig, tokenizer: Tokenizer | None) -> GPTConfig:
    """The model's shape; tokenizer None (a plan made before the tokenizer exists) takes model.vocab_size."""
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if tokenizer is not None and vocab_size != tokenizer.vocab_size:
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


def plan_run(cfg: DictConfig, config: GPTConfig, optimizer: OptimizerConfig, stage: type[StageModule],
             datamodule: StageDataModule) -> RunPlan:
    with torch.device("meta"):  # shapes and parameter groups only, no memory
        model = GPT(config)
    learning_rates = {g["name"]: g["lr"] for g in build_param_groups(model, optimizer)}
    s = cfg.stage
    horizon = Horizon(max_steps=cfg.trainer.max_steps, epochs=s.get("epochs"),
                      tokens_per_param=s.get("target_param_data_ratio"))
    world = world_size(cfg.trainer)
    plan = make_plan(s.name, stage.batch_unit, int(s.batch.per_step), int(s.batch.per_device), config.sequence_len,
                     world, horizon, int(s.val_every), int(s.val_batches), int(s.save_every), model.num_params(),
                     model.flops_per_token(), learning_rates, datamodule.epoch_length(world),
                     stage.rows_per_unit(OmegaConf.to_container(s.module, resolve=True)),
                     peak_flops=device_peak(cfg), mfu=float(cfg.estimate.mfu))
    return replace(plan, compile=compile_model(cfg, plan.total_steps))


def compile_model(cfg: DictConfig, total_steps: int) -> bool:
    """compile=true | false, or auto: on GPUs, and on a CPU once the run is long enough to repay compiling."""
    if isinstance(cfg.compile, bool):
        return cfg.compile
    if cfg.compile != "auto":
        raise ValueError(f"compile={cfg.compile!r}: use true, false or auto")
    return not runs_on_cpu(str(cfg.trainer.accelerator)) or total_steps >= int(cfg.compile_cpu_min_steps)


def device_peak(cfg: DictConfig) -> float | None:
    """estimate.peak_flops, else this machine's: the first GPU's datasheet peak, or the CPU's measured one."""
    if cfg.estimate.peak_flops:
        return float(cfg.estimate.peak_flops)
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    if runs_on_cpu(str(cfg.trainer.accelerator)):
        return peak_flops(torch.device("cpu"), precision)
    return peak_flops(torch.device("cuda", 0), precision) if torch.cuda.is_available() else None


def build_loggers(cfg: DictConfig, folder: Path) -> list[Logger]:
    """The logger group's loggers (conf/logger/), each writing under <run folder>/<its name>."""
    root = log_dir(cfg, folder)
    return [instantiate(settings, save_dir=str(root / name)) for name, settings in (cfg.logger or {}).items()]


def finish_loggers(loggers: list[Logger]) -> None:
    """Close what Lightning leaves open: a wandb run stays live until the process ends, so the next run in the
    same process (a sweep, a test) would log into it, and an offline run file is only complete once closed."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):  # other ranks hold a dummy experiment: finish() does nothing
            logger.experiment.finish()


def build_trainer(cfg: DictConfig, plan: RunPlan, callbacks: list, loggers: list[Logger]) -> L.Trainer:
    """The Trainer, in one call: hardware from the trainer group, the loop's numbers from the plan."""
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    plugins = [AtomicCheckpointIO()]
    if precision == "64-true":
        # float64 reference runs (the equivalence tests): ModelParallelStrategy refuses the precision
        # flag but runs the plugin, which turns the model to float64 before FSDP2 shards it
        plugins.append(DoublePrecision())
        precision = None
    make_trainer = instantiate(cfg.trainer, _partial_=True, _convert_="all")
    trainer = make_trainer(precision=precision, logger=loggers or False, callbacks=callbacks, plugins=plugins,
                           **plan.trainer_kwargs())
    if trainer.world_size != plan.world_size:
        raise ValueError(f"the Trainer runs {trainer.world_size} processes but the plan was made for "
                         f"{plan.world_size}: give trainer.devices and trainer.num_nodes as numbers")
    return trainer


@rank_zero_only
def show(text: str) -> None:
    print(text, flush=True)


def run(cfg: DictConfig) -> dict:
    """Train one stage; returns the metrics written to its metrics.json (only the plan with plan_only)."""
    quiet_libraries()
    if runs_on_cpu(str(cfg.trainer.accelerator)):
        keep_freed_memory()  # every step's buffers reused, not page-faulted in again (llm/stages/host_memory.py)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.time()
    # a plan can be made before the tokenizer is trained, when the config names the vocabulary size
    trained = (absolute(cfg.tokenizer_dir) / "tokenizer.model").exists()
    planning_ahead = cfg.plan_only and cfg.model.vocab_size and not trained
    tokenizer = None if planning_ahead else load_tokenizer(cfg.tokenizer_dir)
    config = model_config(cfg, tokenizer)
    folder = stage_dir(cfg)
    stage = get_class(cfg.stage.module._target_)
    datamodule = instantiate(cfg.data, tokenizer_dir=str(absolute(cfg.tokenizer_dir)),
                             batch_size=int(cfg.stage.batch.per_device), _convert_="all")
    optimizer = instantiate(cfg.optimizer, _convert_="all")
    plan = plan_run(cfg, config, optimizer, stage, datamodule)
    show(f"run plan\n{plan.table()}")
    if cfg.plan_only:
        return {"plan": plan.to_dict()}

    last_ckpt = folder / "checkpoints" / "last.ckpt"
    checkpointing = ModelCheckpoint(dirpath=last_ckpt.parent, save_top_k=0, save_last=True,
                                    every_n_train_steps=plan.save_every)
    throughput = ThroughputMonitor()
    trainer = build_trainer(cfg, plan, [checkpointing, throughput], build_loggers(cfg, folder))
    make_module = instantiate(cfg.stage.module, _partial_=True, _convert_="all")
    module: StageModule = make_module(model_config=config, optimizer=optimizer, tokenizer=tokenizer,
                                      total_steps=plan.total_steps, compile=plan.compile,
                                      init_state=initial_state(cfg, config, tokenizer))
    module.connect(datamodule)

    resume_from = resumable_checkpoint(last_ckpt, cfg.resume, module)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=False)
    trainer.save_checkpoint(last_ckpt, weights_only=False)
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]

    state = module.full_state_dict()  # every rank: a collective under FSDP
    tensorboard = next((lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    metrics = {
        "stage": cfg.stage.name, "steps": trainer.global_step, "total_steps": plan.total_steps,
        "tokens": throughput.total_tokens, "train_loss": train_loss,
        **{k.replace("/", "_"): float(v) for k, v in final.items()},
        **module.final_metrics(),  # a stage's own headline numbers (RL: reward before/after)
        "num_params": module.model.num_params(), "wall_time_s": time.time() - started,
        "world_size": trainer.world_size, "tensorboard_dir": tensorboard, "plan": plan.to_dict(),
        # what the Trainer ran with, beside what the plan said
        "ran": {"steps": trainer.global_step, "accumulation": trainer.accumulate_grad_batches,
                "val_check_interval": trainer.val_check_interval, "limit_val_batches": trainer.limit_val_batches,
                "world_size": trainer.world_size},
    }
    finish_loggers(trainer.loggers)
    if trainer.is_global_zero:
        extra = {"init_from": cfg.stage.get("init_from"), "plan": plan.to_dict(),
                 "config": OmegaConf.to_container(cfg, resolve=True),
                 "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []}
        artifact.save_artifact(folder, state, config, tokenizer, cfg.stage.name, metrics, extra)
        print(f"{cfg.stage.name} artifact: {folder}  " + "  ".join(
            f"{k}={metrics[k]:.4f}" for k in ("train_loss", "val_bpb") if k in metrics))
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        run(cfg)


if __name__ == "__main__":
    main()
