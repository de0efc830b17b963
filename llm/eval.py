"""python -m llm.eval source=<stage|folder> tasks=[arc_easy,mmlu,gsm8k,humaneval] max_per_task=N

Loads an artifact, evaluates it on the named tasks (llm.evaluate.suite), prints a table and merges
the results into the artifact's metrics.json. Ranks come from Lightning Fabric, configured by the
same trainer group as training: `trainer=ddp trainer.accelerator=cpu trainer.devices=2` runs two
processes that each evaluate every other batch; torchmetrics sums their counts, so the scores are
exactly those of one process. Every rank holds the whole model (evaluation needs no sharding, so
trainer=fsdp evaluates data-parallel too).
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

import llm.config  # noqa: F401  (registers the resolvers the configs use)
from llm.artifact import load_artifact, read_metrics, resolve_artifact, update_metrics
from llm.config import absolute, quiet_libraries, resolve_precision
from llm.errors import one_line_errors
from llm.evaluate.sandbox import SandboxSettings
from llm.evaluate.lm_eval_bridge import LmEvalSettings
from llm.evaluate.record import eval_section, merge_eval
from llm.evaluate.sharding import Shard
from llm.evaluate.suite import ChatLossSettings, CoreSettings, HeldoutSettings, SuiteResults, SuiteSettings, run_suite


def build_fabric(cfg: DictConfig) -> Fabric:
    trainer = cfg.trainer
    strategy = trainer.strategy if isinstance(trainer.strategy, str) else "ddp"
    precision = resolve_precision(str(trainer.precision), str(trainer.accelerator))
    return Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.num_nodes,
                  strategy=strategy, precision=precision)


def task_list(cfg: DictConfig, meta: dict) -> list[str]:
    """cfg.tasks, or the defaults of the stage that made the artifact (its stage.eval_tasks); a defaulted
    CORE without a bundle at hand is left out (with a note)."""
    if cfg.tasks is not None:
        return list(OmegaConf.to_container(cfg.tasks)) if not isinstance(cfg.tasks, str) else [cfg.tasks]
    tasks = list(((meta.get("config") or {}).get("stage") or {}).get("eval_tasks") or [])
    if not tasks:
        raise ValueError(f"the artifact of stage {meta.get('stage')!r} names no default evaluation tasks: give "
                         f"them, e.g. tasks=[bpb] or tasks=[gsm8k,arc_easy]")
    bundle = cfg.core.bundle
    if "core" in tasks and not (bundle and (Path(bundle) / "core.yaml").exists()):
        print(f"CORE skipped: no eval bundle at {bundle} (set core.bundle=<folder> or LLM_EVAL_BUNDLE)")
        tasks.remove("core")
    return tasks


def suite_settings(cfg: DictConfig, meta: dict) -> SuiteSettings:
    container = OmegaConf.to_container
    core_tasks = cfg.core.tasks
    return SuiteSettings(
        tasks=task_list(cfg, meta),
        max_per_task=cfg.max_per_task,
        batch_size=int(cfg.batch_size),
        generation=instantiate(cfg.generation, _convert_="all"),
        sandbox=SandboxSettings(**container(cfg.sandbox, resolve=True)),
        heldout=HeldoutSettings(instantiate(cfg.data.source), int(cfg.data.val_docs), cfg.heldout.max_tokens),
        core=CoreSettings(cfg.core.bundle, None if core_tasks is None else list(container(core_tasks))),
        chat_loss=ChatLossSettings(container(cfg.chat_loss.val_tasks, resolve=True), int(cfg.chat_loss.seed)),
        task_options=container(cfg.task_options, resolve=True) or {},
        lm_eval=LmEvalSettings(**container(cfg.lm_eval, resolve=True)),
    )


def evaluate(cfg: DictConfig) -> SuiteResults:
    """Evaluate on every rank; rank 0 prints the table and writes metrics.json."""
    quiet_libraries()
    fabric = build_fabric(cfg)
    fabric.launch()
    started = time.time()
    folder = resolve_artifact(cfg.source, absolute(cfg.paths.artifacts))
    model, tokenizer, meta = load_artifact(folder, device=fabric.device)
    settings = suite_settings(cfg, meta)
    shard = Shard(fabric.global_rank, fabric.world_size, str(fabric.device))
    with fabric.autocast():
        results = run_suite(model, tokenizer, settings, shard, progress=bool(cfg.progress))
    if fabric.is_global_zero:
        seconds = time.time() - started
        print(f"\n{meta['stage']} artifact {folder}: {', '.join(settings.tasks)} "
              f"(max_per_task={settings.max_per_task}, {fabric.world_size} process(es), {seconds:.1f}s)")
        print(results.table())
        if cfg.write_metrics:
            section = {**results.to_eval_section(settings.max_per_task), "world_size": fabric.world_size}
            old = eval_section(read_metrics(folder))
            update_metrics(folder, {"eval": merge_eval(old, section)})
    fabric.barrier()
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
