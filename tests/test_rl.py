"""stage=rl: advantages, which tokens get gradient, seeded rollouts, learning on arithmetic, DDP, refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import compose_config, optimizer_config
from llm import artifact
from llm.data.rl import RLDataModule
from llm.generate.engine import Generator
from llm.generate.sampling import Sampling
from llm.model.gpt import GPT, GPTConfig
from llm.reporting.curves import read_scalars
from llm.stages.rl import (RLModule, Rollouts, group_advantages, policy_gradient_loss, policy_rows,
                           sample_rollouts)
from llm.train import model_config, run

REPO = Path(__file__).resolve().parents[1]
ARITH = ["data=rl_arith", "data.tasks=[{name:arithmetic,difficulty:1,size:2000}]"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(stage: str, artifacts: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """d2 on 128-token rows; RL: 4 prompts x 4 samples per step, 8 held-out prompts x 2 samples."""
    return [f"stage={stage}", "model=d2", "trainer=cpu", f"paths.artifacts={artifacts}",
            f"tokenizer_dir={tokenizer_dir}", "model.sequence_len=128", "trainer.precision=32-true",
            "trainer.enable_progress_bar=false",
            *(ARITH if stage == "rl" else []), "stage.batch.per_device=4", "stage.batch.per_step=4",
            "stage.module.sampling.num_samples=4", "stage.module.sampling.max_tokens=24", "stage.module.eval_samples=2",
            "data.val_tasks=[{name:arithmetic,split:test,difficulty:1,size:8}]", "stage.val_every=1000", *extra]


def save_sft(artifacts: Path, tokenizer, tokenizer_dir: Path, seed: int = 0) -> dict:
    """A stand-in SFT artifact with random weights, shaped like the tiny RL runs."""
    config = model_config(compose_config("train", tiny("rl", artifacts, tokenizer_dir)), tokenizer)
    torch.manual_seed(seed)
    state = GPT(config).state_dict()
    artifact.save_artifact(artifacts / "sft", state, config, tokenizer, "sft", {})
    return state


# ---- the objective ------------------------------------------------------------------------------


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.from_depth(2, vocab_size=64, sequence_len=32))


def fake_rollouts(num_prompts: int = 2, num_samples: int = 3, seed: int = 0) -> Rollouts:
    """Random prompts and answers; in every answer, tokens 2..4 are a forced tool output."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 64, (5 + p,), generator=g).tolist() for p in range(num_prompts)]
    completions, forced = [], []
    for r in range(num_prompts * num_samples):
        n = 6 + r % 3  # ragged lengths: padding too
        completions.append(torch.randint(0, 64, (n,), generator=g).tolist())
        forced.append([2 <= i <= 4 for i in range(n)])
    return Rollouts(prompts, completions, forced, num_samples)


def gradients(model: GPT, rollouts: Rollouts, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    inputs, targets = policy_rows(rollouts, pad_id=0)
    policy_gradient_loss(model, inputs, targets, group_advantages(rewards).flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_a_group_with_equal_rewards_gives_zero_gradient():
    model, rollouts = small_model(), fake_rollouts()
    equal = gradients(model, rollouts, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert all(torch.count_nonzero(g) == 0 for g in equal.values())
    # one group made unequal: now there is a gradient, and it comes from that group alone
    mixed = gradients(model, rollouts, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert sum(g.abs().sum() for g in mixed.values()) > 0
    first_only = Rollouts(rollouts.prompts[:1], rollouts.completions[:3], rollouts.forced[:3], 3)
    alone = gradients(model, first_only, torch.tensor([[1.0, 0.0, 1.0]]))
    tokens = lambda r: sum(not f for fs in r.forced for f in fs)  # noqa: E731  (the normaliser differs)
    for name, g in mixed.items():
        torch.testing.assert_close(g * tokens(rollouts), alone[name] * tokens(first_only), msg=name)


def sign(x: float) -> int:
    return (x > 1e-9) - (x < -1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=8), st.data())
def test_flipping_a_reward_flips_the_sign_of_its_advantage(rewards, data):
    i = data.draw(st.integers(0, len(rewards) - 1))
    flipped = list(rewards)
    flipped[i] = 1.0 - flipped[i]
    for group in (rewards, flipped):
        advantages = group_advantages(torch.tensor([group]))[0]
        expected = 0 if len(set(group)) == 1 else (1 if group[i] == 1.0 else -1)  # above / below the group mean
        assert sign(advantages[i].item()) == expected
        assert abs(advantages.sum().item()) < 1e-6
    before, after = (group_advantages(torch.tensor([g]))[0, i].item() for g in (rewards, flipped))
    if len(set(rewards)) > 1 and len(set(flipped)) > 1:  # neither group all-equal: the sign flips
        assert sign(after) == -sign(before) != 0


def test_prompt_and_tool_output_tokens_get_no_gradient():
    model, rollouts = small_model(), fake_rollouts()
    inputs, targets = policy_rows(rollouts, pad_id=0)
    captured = {}

    def keep_hidden(module, inputs_, out):
        out.retain_grad()
        captured["hidden"] = out

    # after the last block, position t feeds only its own prediction (norm and head are per position);
    # the head starts at zero, which would pass no gradient back at all
    torch.nn.init.normal_(model.lm_head.weight, std=0.1)
    hook = model.blocks[-1].register_forward_hook(keep_hidden)
    rewards = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 0.0]])  # every sample has a nonzero advantage
    policy_gradient_loss(model, inputs, targets, group_advantages(rewards).flatten()).backward()
    hook.remove()
    grad = captured["hidden"].grad.abs().sum(-1)  # (R, T): the gradient reaching each position's prediction
    for r, (ids, forced) in enumerate(zip(rollouts.completions, rollouts.forced)):
        start = len(rollouts.prompts[r // 3]) - 1  # position predicting the first answer token
        sampled = {start + i for i, f in enumerate(forced) if not f}
        for t in range(grad.size(1)):
            if t in sampled:
                assert grad[r, t] > 0, (r, t)
            else:  # predicting a prompt token, a forced tool-output token or padding
                assert grad[r, t] == 0, (r, t)
    assert (targets != -1).sum() == sum(not f for fs in rollouts.forced for f in fs)


def test_the_loss_is_normalised_by_the_sampled_tokens():
    model, rollouts = small_model(), fake_rollouts()
    inputs, targets = policy_rows(rollouts, pad_id=0)
    advantages = group_advantages(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])).flatten()
    with torch.no_grad():
        nll = model(inputs, targets=targets, reduction="none")
        expected = (nll * advantages[:, None]).sum() / (targets != -1).sum()
        assert policy_gradient_loss(model, inputs, targets, advantages) == pytest.approx(expected.item(), rel=1e-6)


def test_rows_fit_the_context():
    rollouts = fake_rollouts()
    rollouts.prompts[1] = list(range(40))  # a prompt longer than the context: its answers are empty
    for r in (3, 4, 5):
        rollouts.completions[r], rollouts.forced[r] = [], []
    inputs, targets = policy_rows(rollouts, pad_id=0, max_len=16)
    assert inputs.shape == (6, 16) and (targets[3:] == -1).all()
    _, uncut = policy_rows(fake_rollouts(), pad_id=0)
    assert torch.equal(targets[:3, :uncut.size(1)], uncut[:3])  # rows that fit are untouched


# ---- rollouts and the stage through llm.train -----------------------------------------------------


def test_same_seed_same_rollouts(tmp_path, tokenizer, tokenizer_dir):
    save_sft(tmp_path, tokenizer, tokenizer_dir)
    model, tokenizer, _ = artifact.load_artifact(tmp_path / "sft")
    generator = Generator(model, tokenizer)
    prompts = [tokenizer.render_for_completion({"messages": [{"role": "user", "content": q}]})
               for q in ("What is 2 plus 3?", "What is 9 minus 4?")]
    a, b, c = (sample_rollouts(generator, prompts, Sampling(max_tokens=12, num_samples=3, seed=seed))
               for seed in (7, 7, 8))
    assert a.completions == b.completions and a.forced == b.forced
    assert a.completions != c.completions
    assert len({tuple(x) for x in a.completions}) > 1  # the samples of a group differ


def test_same_seed_same_first_update(tmp_path, tokenizer, tokenizer_dir, monkeypatch):
    # random weights never answer right: reward the answer's parity instead, so that groups differ
    monkeypatch.setattr(RLDataModule, "reward", lambda self, conversation, text: float(len(text) % 2))

    def first_update(name: str, seed: int) -> dict:
        save_sft(tmp_path / name, tokenizer, tokenizer_dir)
        metrics = run(compose_config("train", tiny("rl", tmp_path / name, tokenizer_dir, "trainer.max_steps=1",
                                                   f"seed={seed}", "optimizer.lr_scale=1.0")))
        assert metrics["steps"] == 1 and artifact.read_meta(tmp_path / name / "rl")["init_from"] == "sft"
        return artifact.load_artifact(tmp_path / name / "rl")[0].state_dict()

    start = save_sft(tmp_path / "start", tokenizer, tokenizer_dir)
    a, b, c = first_update("a", 1), first_update("b", 1), first_update("c", 2)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the step changed the weights
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # another seed, other rollouts, another update


class Killed(Exception):
    """Stands in for the process dying mid-run."""


def test_killed_run_resumes_like_an_uninterrupted_one(tmp_path, tokenizer, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(RLDataModule, "reward", lambda self, conversation, text: float(len(text) % 2))
    overrides = lambda name: tiny("rl", tmp_path / name, tokenizer_dir, "trainer.max_steps=3",  # noqa: E731
                                  "optimizer.lr_scale=1.0", "stage.save_every=1")
    for name in ("straight", "killed"):
        save_sft(tmp_path / name, tokenizer, tokenizer_dir)
    straight = run(compose_config("train", overrides("straight")))

    step = RLModule.training_step

    def dies_at_step_2(self, batch, batch_idx):
        if self.global_step == 2:
            raise Killed("killed at step 2")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(RLModule, "training_step", dies_at_step_2)
    with pytest.raises(Killed):
        run(compose_config("train", overrides("killed")))
    trained: list[int] = []

    def records(self, batch, batch_idx):
        trained.append(self.global_step)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(RLModule, "training_step", records)
    resumed = run(compose_config("train", overrides("killed")))  # continues from checkpoints/last.ckpt (step 2)
    assert trained == [2]  # only the step the killed run never finished is trained again
    assert resumed["steps"] == 3 and resumed["reward_before"] == straight["reward_before"]
    a = artifact.load_artifact(tmp_path / "straight" / "rl")[0].state_dict()
    b = artifact.load_artifact(tmp_path / "killed" / "rl")[0].state_dict()
    for k in a:  # the same prompts, sampling seeds, optimizer state and schedule after the resume
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_rl_refuses_without_an_sft_artifact(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match=r"no finished artifact at .*sft.*python -m llm.train stage=sft"):
        run(compose_config("train", tiny("rl", tmp_path, tokenizer_dir, "trainer.max_steps=1")))
    assert not (tmp_path / "rl").exists() or not (tmp_path / "rl" / "config.yaml").exists()


def test_rl_refuses_fsdp(tokenizer):
    module = RLModule(GPTConfig.from_depth(2, vocab_size=tokenizer.vocab_size, sequence_len=32), optimizer_config(),
                      tokenizer, total_steps=1, sampling=Sampling(max_tokens=8), eval_samples=2, seed=0,
                      warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0)
    module._device_mesh = object()  # what ModelParallelStrategy hands the module
    with pytest.raises(ValueError, match="trainer=ddp"):
        module.configure_model()


def test_rl_data_shards_by_rank_and_refuses_tasks_without_reward(tokenizer, tokenizer_dir):
    cfg = compose_config("train", ["stage=rl", *ARITH])
    dm = RLDataModule(tasks=list(cfg.data.tasks), val_tasks=[{"name": "arithmetic", "split": "test", "size": 8}],
                      tokenizer_dir=str(tokenizer_dir), batch_size=3, seq_len=128)
    ranks = [dm.train_batches(rank, world_size=2) for rank in (0, 1)]
    seen = [[batch["index"].tolist() for batch, _ in zip(iter(r), range(4))] for r in ranks]
    flat = [sum(s, []) for s in seen]
    assert not set(flat[0]) & set(flat[1]) and len(set(flat[0])) == 12
    batch = next(iter(ranks[0]))
    assert batch["prompts"][0][-1] == tokenizer.special_id("assistant_start")
    assert dm.reward(batch["conversations"][0], "#### " + str(batch["conversations"][0]["messages"][1]
                                                               ["content"][2]["text"])) == 1.0
    resumed = dm.train_batches(0, world_size=2, start=int(batch["cursor"][1]))  # resume after the first batch
    assert next(iter(resumed))["index"].tolist() == seen[0][1]
    with pytest.raises(NotImplementedError, match="RL-capable tasks"):
        RLDataModule(tasks=[{"name": "identity"}], val_tasks=[{"name": "arithmetic", "split": "test", "size": 8}],
                     tokenizer_dir=str(tokenizer_dir), batch_size=3, seq_len=128)


@pytest.mark.slow
def test_ddp_ranks_roll_out_disjoint_prompts(tmp_path, tokenizer, tokenizer_dir):
    save_sft(tmp_path, tokenizer, tokenizer_dir)
    overrides = tiny("rl", tmp_path, tokenizer_dir, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                     "trainer.max_steps=2", "stage.batch.per_device=2")
    proc = subprocess.run([sys.executable, "-m", "llm.train", *overrides, f"hydra.run.dir={tmp_path}/hydra"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2
    for name in ("val_reward", "val_pass@1", "val_pass@2", "reward_before", "reward_after", "train_loss"):
        assert math.isfinite(metrics[name]), name
    # the 2 ranks' 2 prompts each, gathered: 4 different prompts in every step
    assert list(read_scalars(metrics["tensorboard_dir"], "train/distinct_prompts").values()) == [4.0, 4.0]


# ---- learning -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_rl_raises_the_reward_on_held_out_arithmetic(tmp_path, tokenizer_dir):
    """A d2 model SFT-trained briefly on arithmetic (right about 1 time in 4 when sampling at temperature 1),
    then 30 RL steps of 8 prompts x 8 samples: the mean reward on 64 held-out prompts clearly rises."""
    common = ["model=d2", "trainer=cpu", f"paths.artifacts={tmp_path}", f"tokenizer_dir={tokenizer_dir}",
              "model.sequence_len=128", "trainer.precision=32-true", "trainer.enable_progress_bar=false"]
    run(compose_config("train", [
        "stage=sft", *common, "stage.init_from=null", "trainer.max_steps=80", "optimizer.lr_scale=1.0",
        "stage.module.warmdown_ratio=0.3", "optimizer.muon_momentum_warmup_steps=0",
        "data.tasks=[{name:arithmetic,difficulty:1,size:20000}]",
        "data.val_tasks=[{name:arithmetic,split:test,difficulty:1,size:16}]", "stage.batch.per_device=16",
        "data.num_workers=0", "stage.batch.per_step=16", "stage.val_every=1000", "stage.val_batches=1"]))
    metrics = run(compose_config("train", [
        "stage=rl", *common, "data=rl_arith", "trainer.max_steps=30", "stage.batch.per_step=8",
        "stage.batch.per_device=8",
        "stage.module.sampling.num_samples=8", "stage.module.sampling.max_tokens=48", "stage.module.eval_samples=4",
        "optimizer.lr_scale=0.3", "optimizer.embedding_lr=0.02", "stage.val_every=1000"]))
    before, after = metrics["reward_before"], metrics["reward_after"]
    print(f"held-out reward {before:.3f} -> {after:.3f}, pass@4 {metrics['val_pass@4']:.3f}")
    assert 0.1 < before < 0.5  # a model with something to learn
    assert after > before + 0.08 and after > 1.3 * before
    rewards = read_scalars(metrics["tensorboard_dir"], "train/reward")
    assert sum(list(rewards.values())[-10:]) > sum(list(rewards.values())[:10])
