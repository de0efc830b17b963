"""Tests for llm.optim: Muon math, param grouping, schedules, checkpoint resume, DDP and FSDP2."""

import io
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from conftest import optimizer_config
from llm.optim.groups import build_optimizer, build_param_groups
from llm.optim.muon import MuonAdamW, zeropower_via_newtonschulz5
from llm.optim.schedule import apply_schedule, lr_multiplier, muon_momentum


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# A tiny stand-in with the GPT attribute layout (wte, optional wpe, blocks, lm_head, config.n_embd)


@dataclass
class TinyConfig:
    vocab_size: int = 65  # odd: FSDP2 shards of wte / lm_head are uneven (33 + 32 rows)
    n_embd: int = 32
    n_hidden: int = 37  # odd: Muon matrices get uneven shards too
    n_layer: int = 2
    seq_len: int = 8
    tied: bool = False
    learned_pos: bool = False


class TinyBlock(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.n_hidden, bias=False)
        self.proj = nn.Linear(cfg.n_hidden, cfg.n_embd, bias=False)
        self.gain = nn.Parameter(torch.ones(cfg.n_embd))  # a 1-D param: the "scalar" group

    def forward(self, x):
        h = F.relu(self.fc(F.rms_norm(x, (x.size(-1),)))).square()
        return x + self.gain * self.proj(h)


class TinyGPT(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd) if cfg.learned_pos else None
        self.blocks = nn.ModuleList(TinyBlock(cfg) for _ in range(cfg.n_layer))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(F.rms_norm(x, (x.size(-1),)))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def make_model(seed=0, dtype=torch.float32, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(TinyConfig(**kw)).to(dtype)


def make_batch(step, batch=4, cfg=TinyConfig()):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def train(model, opt, steps, cfg, start=0, total=5, rank=0, world=1):
    """Steps [start, steps) on the global batch; each rank takes its contiguous slice."""
    for step in range(start, steps):
        apply_schedule(opt, step, total, warmup_ratio=0.2, warmdown_ratio=0.4, final_lr_frac=0.0, momentum=cfg)
        x, y = make_batch(step)
        per_rank = x.size(0) // world
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        model(x[sl], y[sl]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------
# Newton-Schulz and the two update rules


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    torch.manual_seed(0)
    # Ill-conditioned input: singular values spread over 2 orders of magnitude (5 quintic steps
    # lift anything above ~1/400 of the Frobenius norm into the band).
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0]))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1]))
    k = min(shape)
    s = torch.logspace(0, -2, k)
    G = u[:, :k] @ torch.diag(s) @ v[:, :k].T * 7.0
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == G.dtype
    sv = torch.linalg.svdvals(X)
    assert sv.min() > 0.5 and sv.max() < 1.3, sv
    # Same singular vectors as G: X is close to the exact polar factor U V^T.
    polar = u[:, :k] @ v[:, :k].T
    assert (X - polar).norm() / polar.norm() < 0.35


def test_newton_schulz_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        zeropower_via_newtonschulz5(torch.randn(5))


def test_newton_schulz_of_a_stack_is_each_matrix_alone():
    torch.manual_seed(0)
    G = torch.randn(3, 40, 24, dtype=torch.float64)  # tall: iterated on the transpose
    stacked = zeropower_via_newtonschulz5(G)
    torch.testing.assert_close(stacked, torch.stack([zeropower_via_newtonschulz5(g) for g in G]),
                               rtol=1e-12, atol=1e-12)


def test_muon_batches_same_shaped_matrices_without_changing_any_update():
    """The optimizer stacks updates by shape (tall ones turned wide); each param must move exactly
    as it would in an optimizer of its own."""
    torch.manual_seed(0)
    shapes = [(16, 16), (32, 16), (16, 32), (16, 16), (8, 24)]
    together = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    alone = [nn.Parameter(p.detach().clone()) for p in together]
    start = [p.detach().clone() for p in together]
    opt = MuonAdamW([dict(kind="muon", params=together, lr=0.05)])
    singles = [MuonAdamW([dict(kind="muon", params=[p], lr=0.05)]) for p in alone]
    for _ in range(3):
        grads = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for p, q, g in zip(together, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for single in singles:
            single.step()
    for p, q, p0 in zip(together, alone, start):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert (p - p0).abs().max() > 1e-3  # and every one of them moved


def test_muon_reduces_loss_on_least_squares():
    torch.manual_seed(0)
    X, W_true = torch.randn(256, 16), 0.1 * torch.randn(24, 16)
    Y = X @ W_true.T
    W = nn.Parameter(torch.zeros(24, 16))
    opt = MuonAdamW([dict(kind="muon", params=[W], lr=0.05)])
    losses = []

    def closure():  # Lightning's automatic optimization calls step(closure)
        opt.zero_grad()
        loss = F.mse_loss(X @ W.T, Y)
        loss.backward()
        return loss

    for _ in range(60):
        losses.append(opt.step(closure).item())
    assert losses[-1] < 0.05 * losses[0], losses[::10]


@pytest.mark.parametrize("fused", [None, False])  # None: the default, fused in one CPU process
def test_adamw_groups_match_torch_adamw_exactly(fused):
    torch.manual_seed(0)
    shapes = [(5, 7), (7,), (3, 4)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt = MuonAdamW([dict(kind="adamw", params=ours, **kw)], fused=fused)
    ref_opt = torch.optim.AdamW(ref, foreach=False, fused=fused is None, **kw)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape)
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_bad_groups_raise():
    W, v = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[W], lr=0.1)])
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([dict(kind="muon", params=[v], lr=0.1)])
    with pytest.raises(ValueError, match="lr"):
        MuonAdamW([dict(kind="adamw", params=[v])])


# ---------------------------------------------------------------------------------------------
# Grouping


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_grouping_untied_with_lr_scaling():
    model = make_model(learned_pos=True)
    cfg = optimizer_config()
    groups = _groups(build_optimizer(model, cfg))
    s = (32 / 768) ** -0.5
    assert set(groups) == {"matrix", "embedding", "unembedding", "scalar"}
    assert groups["matrix"]["kind"] == "muon" and groups["matrix"]["lr"] == cfg.matrix_lr
    assert groups["embedding"]["lr"] == pytest.approx(cfg.embedding_lr * s)
    assert groups["unembedding"]["lr"] == pytest.approx(cfg.unembedding_lr * s)
    assert groups["scalar"]["lr"] == cfg.scalar_lr
    assert all(g["initial_lr"] == g["lr"] for g in groups.values())
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["embedding"]["params"]) == ids([model.wte.weight, model.wpe.weight])
    assert ids(groups["unembedding"]["params"]) == ids([model.lm_head.weight])
    assert ids(groups["matrix"]["params"]) == ids(p for b in model.blocks for p in (b.fc.weight, b.proj.weight))
    assert ids(groups["scalar"]["params"]) == ids(b.gain for b in model.blocks)
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))


def test_lr_scale_multiplies_every_group():
    model = make_model(learned_pos=True)
    full = _groups(build_optimizer(model, optimizer_config()))
    scaled = _groups(build_optimizer(model, optimizer_config(lr_scale=0.02)))
    for name, group in full.items():
        assert scaled[name]["lr"] == pytest.approx(0.02 * group["lr"])
        assert scaled[name]["initial_lr"] == scaled[name]["lr"]
    with pytest.raises(ValueError, match="lr_scale"):
        optimizer_config(lr_scale=0.0)


def test_grouping_tied_has_no_duplicate_and_trains():
    model = make_model(tied=True)
    opt = build_optimizer(model, optimizer_config())
    groups = _groups(opt)
    assert "unembedding" not in groups and "embedding" not in groups
    assert groups["tied_embedding"]["params"] == [model.wte.weight]
    assert groups["tied_embedding"]["lr"] == pytest.approx(0.004 * (32 / 768) ** -0.5)
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))
    # gpt2-style tied runs must still train: memorise one batch with the default config.
    x, y = make_batch(0)
    first = model(x, y).item()
    for _ in range(40):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    assert model(x, y).item() < 0.7 * first


def test_adamw_mode_and_yaml_list_betas():
    cfg = optimizer_config("adamw", matrix_lr=1e-3, adam_betas=[0.9, 0.99], weight_decay=0.1)
    assert cfg.adam_betas == (0.9, 0.99)
    groups = _groups(build_optimizer(make_model(), cfg))
    assert all(g["kind"] == "adamw" and g["betas"] == (0.9, 0.99) for g in groups.values())
    assert groups["matrix"]["lr"] == pytest.approx(1e-3 * (32 / 768) ** -0.5)
    assert groups["matrix"]["weight_decay"] == 0.1 and groups["embedding"]["weight_decay"] == 0.0


def test_bad_config_and_unknown_param_raise():
    with pytest.raises(ValueError, match="sgd"):
        optimizer_config(name="sgd")
    with pytest.raises(ValueError, match="adam_betas"):
        optimizer_config(adam_betas=[0.9])
    model = make_model()
    model.extra = nn.Parameter(torch.randn(4, 4))  # a 2-D weight outside blocks: no rule for it
    with pytest.raises(ValueError, match="extra"):
        build_optimizer(model, optimizer_config())


# ---------------------------------------------------------------------------------------------
# Checkpoint resume


def test_state_dict_resume_is_bit_identical():
    cfg = optimizer_config()
    model = make_model()
    opt = build_optimizer(model, cfg)
    train(model, opt, 3, cfg)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, cfg, start=3)

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed_opt = build_optimizer(resumed, cfg)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt.load_state_dict(ckpt["opt"])
    train(resumed, resumed_opt, 5, cfg, start=3)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------
# Schedules


def test_lr_multiplier_boundaries():
    # 10 steps: warmup 2, constant through step 7, warmdown over 3 to 0.1
    f = lambda s: lr_multiplier(s, 10, warmup_ratio=0.2, warmdown_ratio=0.3, final_lr_frac=0.1)  # noqa: E731
    assert [f(0), f(1), f(2), f(7)] == [0.5, 1.0, 1.0, 1.0]
    assert f(8) == pytest.approx(0.1 + 0.9 * 2 / 3)
    assert f(10) == pytest.approx(0.1) and f(12) == pytest.approx(0.1)
    defaults = {"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0}
    g = lambda s, **kw: lr_multiplier(s, 10, **{**defaults, **kw})  # noqa: E731
    assert g(0) == 1.0 and g(10) == 0.0
    assert g(50, warmdown_ratio=0.0) == 1.0


@pytest.mark.parametrize("kw", [dict(warmup_ratio=0.6, warmdown_ratio=0.5), dict(warmup_ratio=-0.1),
                                dict(warmdown_ratio=1.5), dict(final_lr_frac=2.0)])
def test_bad_schedule_raises(kw):
    with pytest.raises(ValueError, match="ratio|final_lr_frac"):
        lr_multiplier(0, 10, **{"warmup_ratio": 0.0, "warmdown_ratio": 0.2, "final_lr_frac": 0.0, **kw})


def test_momentum_warmup_and_apply_schedule():
    cfg = optimizer_config()
    assert muon_momentum(0, cfg) == 0.85 and muon_momentum(300, cfg) == 0.95 and muon_momentum(10**6, cfg) == 0.95
    assert muon_momentum(150, cfg) == pytest.approx(0.90)
    opt = build_optimizer(make_model(), cfg)
    mult = apply_schedule(opt, 9, 10, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.0, momentum=cfg)
    assert mult == pytest.approx(0.2)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.2 * g["initial_lr"])
        assert g.get("momentum") == (pytest.approx(0.85 + 0.1 * 9 / 300) if g["kind"] == "muon" else None)


# ---------------------------------------------------------------------------------------------
# Distributed: 2 CPU processes over gloo must match one process on the same global batch.
# In float64 (Muon's Newton-Schulz too): the ranks sum gradients in another order than one process,
# and in float32/bf16 that rounding, amplified by Adam's first sign-like steps, depends on the CPU's
# kernels (AMD and Intel differ by ~1e-3). In float64 it stays ~1e-12, far below the tolerance, while
# a real divergence (a missing all-reduce, a wrong shard) moves the weights by ~1e-2.


STEPS, CKPT_AT = 5, 3


def _dist_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A short timeout: a rank stuck in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {"fsdp": _run_fsdp(rank, world, out_dir), "ddp": _run_ddp(rank, world)}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _sharded_model(seed):
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed=seed, dtype=torch.float64)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _run_fsdp(rank, world, out_dir):
    """Train with FSDP2; checkpoint through torch.distributed.checkpoint (Lightning's default) midway."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

    cfg = optimizer_config()
    model = _sharded_model(seed=0)
    opt = build_optimizer(model, cfg)  # after sharding: params are DTensors
    train(model, opt, CKPT_AT, cfg, total=STEPS, rank=rank, world=world)
    ckpt = os.path.join(out_dir, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    momentum_is_sharded = all(
        st["momentum_buffer"].to_local().shape[0] < p.shape[0]
        for g in opt.param_groups if g["kind"] == "muon" for p in g["params"] for st in [opt.state[p]])
    train(model, opt, STEPS, cfg, start=CKPT_AT, total=STEPS, rank=rank, world=world)

    resumed = _sharded_model(seed=123)
    resumed_opt = build_optimizer(resumed, cfg)
    state = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    train(resumed, resumed_opt, STEPS, cfg, start=CKPT_AT, total=STEPS, rank=rank, world=world)

    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    resumed_full = {n: p.full_tensor() for n, p in resumed.named_parameters()}
    return dict(params=full, resume_equal=all(torch.equal(full[n], resumed_full[n]) for n in full),
                momentum_is_sharded=momentum_is_sharded)


def _run_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = optimizer_config()
    model = make_model(seed=0, dtype=torch.float64)
    opt = build_optimizer(model, cfg)
    train(DDP(model), opt, STEPS, cfg, total=STEPS, rank=rank, world=world)
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()})


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    # fork, not spawn: the children inherit the imported torch instead of paying seconds to re-import it.
    mp.start_processes(_dist_worker, args=(2, _free_port(), out_dir), nprocs=2, join=True, start_method="fork")
    return torch.load(os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def single_process_params():
    cfg = optimizer_config()
    model = make_model(seed=0, dtype=torch.float64)
    # distributed CPU runs take torch's single-tensor AdamW kernel (see MuonAdamW), so compare with it
    train(model, MuonAdamW(build_param_groups(model, cfg), fused=False), STEPS, cfg, total=STEPS)
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_params_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.float64
        moved = (want[name] - make_model(seed=0, dtype=torch.float64).state_dict()[name]).abs().max()
        assert moved > 1e-3, f"{name} did not train"  # the comparison below must mean something
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=0, msg=lambda m: f"{name}: {m}")


def test_fsdp2_matches_single_process(distributed_results, single_process_params):
    fsdp = distributed_results["fsdp"]
    assert fsdp["momentum_is_sharded"], "Muon momentum should be kept as the local shard"
    _assert_params_close(fsdp["params"], single_process_params)


def test_fsdp2_checkpoint_resume_is_bit_identical(distributed_results):
    assert distributed_results["fsdp"]["resume_equal"]


def test_ddp_matches_single_process(distributed_results, single_process_params):
    _assert_params_close(distributed_results["ddp"]["params"], single_process_params)
