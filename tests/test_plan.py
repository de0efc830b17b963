"""The run plan: a pure function of the stage's batch, the hardware and the horizon; what every run prints,
stores, and what the Trainer then runs (steps, accumulation, validation interval), on 1 and 2 ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import compose_config, pretrain_module
from llm.reporting.curves import read_scalars
from llm.stages.plan import Horizon, make_plan
from llm.train import run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plan(**kw):
    args = dict(stage="base", unit="tokens", per_step=4096, per_device=8, seq_len=256, world_size=1,
                horizon=Horizon(max_steps=10), val_every=5, val_batches=2, save_every=5, num_params=1000,
                flops_per_token=6000.0, learning_rates={"matrix": 0.02})
    return make_plan(**{**args, **kw})


def test_accumulation_fills_the_batch_in_each_unit():
    assert plan().accumulation == 2  # 4096 tokens / (8 rows x 256)
    assert plan(world_size=2).accumulation == 1
    chat = plan(unit="rows", per_step=32, per_device=4, world_size=2)
    assert chat.accumulation == 4 and chat.positions_per_step == 32 * 256
    rl = plan(unit="prompts", per_step=16, per_device=2, rows_per_unit=8)
    assert rl.accumulation == 8 and rl.positions_per_step == 16 * 8 * 256
    assert plan().trainer_kwargs() == dict(max_steps=10, accumulate_grad_batches=2, val_check_interval=10,
                                           limit_val_batches=2, check_val_every_n_epoch=None)


def test_horizons():
    assert plan(horizon=Horizon(max_steps=-1, tokens_per_param=20)).total_steps == 5  # 20 x 1000 / 4096, rounded up
    epochs = plan(unit="rows", per_step=16, per_device=8, horizon=Horizon(max_steps=-1, epochs=2), epoch_length=100)
    assert (epochs.total_steps, epochs.horizon) == (13, "2 epoch(s)")
    assert plan(horizon=Horizon(max_steps=7, epochs=1), epoch_length=10**6).total_steps == 7  # max_steps wins
    # nanochat's d20 speedrun shape: 8 GPUs x 32 rows x 2048 = 524,288 tokens a step, no accumulation
    d20 = plan(per_step=524288, per_device=32, seq_len=2048, world_size=8)
    assert d20.accumulation == 1 and d20.positions_per_step == 524288


@pytest.mark.parametrize("kw, match", [
    (dict(horizon=Horizon(max_steps=0)), r"trainer.max_steps=0"),
    (dict(horizon=Horizon(max_steps=-1)), r"no length"),
    (dict(horizon=Horizon(max_steps=-1, epochs=1)), r"stage.epochs=1 needs data with an end"),
    (dict(per_step=1000), r"stage.batch.per_step=1000 tokens is not a multiple of .*2048"),
    (dict(unit="rows", per_step=10, per_device=4), r"multiple of 4"),
    (dict(val_every=0), r"stage.val_every=0"),
    (dict(unit="bytes"), r"unit 'bytes'"),
])
def test_bad_plans_name_the_setting(kw, match):
    with pytest.raises(ValueError, match=match):
        plan(**kw)


def base_overrides(artifacts: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["stage=base", "model=d2", "trainer=cpu", f"paths.artifacts={artifacts}", f"tokenizer_dir={tokenizer_dir}",
            "model.sequence_len=64", "stage.batch.per_device=4", "stage.batch.per_step=512", "data.num_workers=0",
            "stage.val_batches=1", "stage.module.sample_every=0", "trainer.enable_progress_bar=false", *extra]


@pytest.mark.parametrize("steps, compiled", [(499, False), (500, True)])
def test_auto_compiles_cpu_runs_long_enough_to_repay_it(tmp_path, tokenizer_dir, steps, compiled):
    cfg = compose_config("train", base_overrides(tmp_path, tokenizer_dir, f"trainer.max_steps={steps}",
                                                 "plan_only=true"))
    assert cfg.compile == "auto" and cfg.compile_cpu_min_steps == 500
    assert run(cfg)["plan"]["compile"] is compiled
    forced = compose_config("train", base_overrides(tmp_path, tokenizer_dir, "trainer.max_steps=10", "compile=true",
                                                    "plan_only=true"))
    assert run(forced)["plan"]["compile"] is True


@pytest.mark.parametrize("compile", [False, True])
def test_compiled_runs_take_the_cpu_loss_kernel_and_eager_ones_do_not(tokenizer, compile):
    module = pretrain_module(tokenizer, n_layer=1, total_steps=2, sequence_len=32, compile=compile)
    module.configure_model()
    assert module.model.cpu_loss_kernel is compile
    assert (module._forward is not module.model) is compile  # the compiled wrapper, off the module tree


def test_plan_only_prints_the_plan_and_trains_nothing(tmp_path, tokenizer_dir):
    out = subprocess.run([sys.executable, "-m", "llm.train", *base_overrides(tmp_path, tokenizer_dir), "plan_only=true",
                          f"hydra.run.dir={tmp_path}/hydra"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "512 tokens/step = 4 per device x 1 rank(s) x 2 accumulation" in out.stdout
    assert "tokens/parameter" in out.stdout and "learning rates" in out.stdout
    assert not (tmp_path / "base").exists()


def assert_ran_as_planned(metrics: dict, folder: Path, steps: int, accumulation: int, world: int, val_steps: set[int],
                          val_tag: str) -> None:
    planned, ran = metrics["plan"], metrics["ran"]
    assert (planned["total_steps"], planned["accumulation"], planned["world_size"]) == (steps, accumulation, world)
    assert ran == {"steps": steps, "accumulation": accumulation, "world_size": world,
                   "val_check_interval": planned["val_every"] * accumulation, "limit_val_batches": 1}
    assert yaml.safe_load((folder / "config.yaml").read_text())["plan"] == planned  # stored with the artifact
    assert json.loads((folder / "metrics.json").read_text())["plan"] == planned
    # a validation after every val_every optimizer steps, as the plan says (Lightning logs it at the 0-based
    # index of the step it follows, like that step's training metrics)
    assert set(read_scalars(metrics["tensorboard_dir"], val_tag)) >= {s - 1 for s in val_steps}


def count_micro_steps(monkeypatch, module_class) -> list[int]:
    calls: list[int] = []
    step = module_class.training_step

    def counted(self, batch, batch_idx):
        calls.append(self.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(module_class, "training_step", counted)
    return calls


def test_base_runs_its_plan(tmp_path, tokenizer_dir, monkeypatch, capsys):
    from llm.stages.base import PretrainModule

    calls = count_micro_steps(monkeypatch, PretrainModule)
    metrics = run(compose_config("train", base_overrides(tmp_path, tokenizer_dir, "trainer.max_steps=4",
                                                          "stage.val_every=2")))
    assert "512 tokens/step = 4 per device x 1 rank(s) x 2 accumulation" in capsys.readouterr().out
    assert calls == [0, 0, 1, 1, 2, 2, 3, 3]  # 2 micro-batches per optimizer step
    assert_ran_as_planned(metrics, tmp_path / "base", steps=4, accumulation=2, world=1, val_steps={2, 4},
                          val_tag="val/bpb")
    assert metrics["tokens"] == 4 * 512  # packed rows: every token is real


@pytest.mark.slow
def test_chat_and_rl_run_their_plans_on_two_ranks(tmp_path, tokenizer, tokenizer_dir):
    from test_chat_stage import save_stage, tiny as chat_tiny
    from test_rl import save_sft, tiny as rl_tiny

    two_ranks = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2",
                 "stage.val_every=1", "stage.val_batches=1"]
    sft = chat_tiny("sft", tmp_path / "chat", tokenizer_dir, *two_ranks, "stage.batch.per_device=2",
                    "stage.batch.per_step=8")
    save_stage("mid", tmp_path / "chat", tokenizer, sft)
    rl = rl_tiny("rl", tmp_path / "rl", tokenizer_dir, *two_ranks, "stage.batch.per_device=1",
                 "stage.batch.per_step=4", "stage.module.sampling.max_tokens=8")
    save_sft(tmp_path / "rl", tokenizer, tokenizer_dir)
    for name, overrides, val_tag in (("chat", sft, "val/loss"), ("rl", rl, "val/reward")):
        proc = subprocess.run([sys.executable, "-m", "llm.train", *overrides, f"hydra.run.dir={tmp_path}/{name}/hydra"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "x 2 rank(s) x 2 accumulation" in proc.stdout
        folder = tmp_path / name / ("sft" if name == "chat" else "rl")
        metrics = json.loads((folder / "metrics.json").read_text())
        assert_ran_as_planned(metrics, folder, steps=2, accumulation=2, world=2, val_steps={1, 2}, val_tag=val_tag)
        assert 0 < metrics["tokens"] <= 2 * metrics["plan"]["positions_per_step"]  # real tokens, never padding


def test_planning_leaves_the_seeded_random_state_alone(tmp_path, tokenizer_dir):
    # the plan measures this CPU's matmul peak before the model is initialised from the seeded global RNG:
    # drawing from that RNG there would give every run other initial weights than its seed promises
    from llm.stages.throughput import measure_matmul_flops

    state = torch.get_rng_state()
    measure_matmul_flops(seconds=0.01)
    assert torch.equal(torch.get_rng_state(), state)
    cfg = compose_config("train", base_overrides(tmp_path, tokenizer_dir, "trainer.max_steps=3", "plan_only=true"))
    run(cfg)  # seeds, plans
    after_plan = torch.rand(4)
    torch.manual_seed(cfg.seed)
    assert torch.equal(after_plan, torch.rand(4))
