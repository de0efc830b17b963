"""The chunked output-layer cross entropy equals the plain logits path, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.model import cpu_loss_kernel, fused_loss
from llm.model.fused_loss import linear_cross_entropy

BLOCK_ROWS_OF = fused_loss.block_rows


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # tiny blocks and chunks, so a few dozen rows already span several of each, the last ones partial
    monkeypatch.setattr(fused_loss, "block_rows", lambda vocab, dtype: 24)
    monkeypatch.setattr(fused_loss, "CPU_CHUNK_ROWS", 5)


def test_blocks_hold_the_same_bytes_whatever_the_dtype():
    # (the fixture above shrinks blocks for every other test)
    rows = BLOCK_ROWS_OF
    assert rows(32768, torch.float32) * 32768 * 4 == rows(32768, torch.bfloat16) * 32768 * 2 == fused_loss.BLOCK_BYTES
    assert rows(65536, torch.bfloat16) == rows(32768, torch.float32)
    assert rows(2**30, torch.float64) == 1  # never zero rows


def reference(h, weight, targets, softcap, reduction):
    logits = h @ weight.T
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none")
    losses = losses.view(targets.shape)
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / (targets >= 0).sum().clamp(min=1)


# float32: the two paths round differently (and by CPU); float64: they agree to rounding far below 1e-9
TOLERANCES = {torch.float32: dict(value=1e-5, grad=1e-4, grad_abs=1e-6),
              torch.float64: dict(value=1e-10, grad=1e-10, grad_abs=1e-12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("softcap", [15.0, None])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_and_gradients_match_the_logits_path(softcap, reduction, dtype):
    torch.manual_seed(0)
    B, T, C, V = 3, 23, 16, 101  # 69 rows: three blocks, the last one partial
    h = torch.randn(B, T, C, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, C, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[0, :5] = -1  # ignored positions
    got = linear_cross_entropy(h, weight, targets, softcap, reduction)
    (got * 1.7).backward()  # a non-unit upstream gradient
    gh, gw = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    want = reference(h, weight, targets, softcap, reduction)
    (want * 1.7).backward()
    tol = TOLERANCES[dtype]
    assert got.dtype == gh.dtype == gw.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol["value"], atol=tol["value"])
    torch.testing.assert_close(gh, h.grad, rtol=tol["grad"], atol=tol["grad_abs"])
    torch.testing.assert_close(gw, weight.grad, rtol=tol["grad"], atol=tol["grad_abs"])
    assert gh[0, :5].abs().max() == 0  # ignored positions get no gradient


def test_per_token_losses_without_gradients():
    torch.manual_seed(1)
    h, weight = torch.randn(2, 300, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (2, 300))
    targets[1, -3:] = -1
    with torch.no_grad():
        got = linear_cross_entropy(h, weight, targets, 15.0, "none")
    torch.testing.assert_close(got, reference(h, weight, targets, 15.0, "none"))
    assert got.shape == (2, 300) and (got[1, -3:] == 0).all()


def test_bf16_autocast_stays_close_and_keeps_fp32_gradients():
    torch.manual_seed(2)
    h = torch.randn(4, 64, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (4, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, weight, targets, 15.0, "mean")
    got.backward()
    assert h.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    want = reference(h.detach(), weight.detach(), targets, 15.0, "mean")
    assert got.item() == pytest.approx(want.item(), rel=2e-2)


def test_far_off_targets_keep_their_exact_loss():
    # without a cap a logit gap of ~200 makes p_target underflow to 0 in float32: the loss must stay exact
    torch.manual_seed(3)
    h = torch.randn(2, 30, 8)
    weight = torch.randn(40, 8) * 30
    targets = torch.randint(0, 40, (2, 30))
    got = linear_cross_entropy(h, weight, targets, None, "none")
    want = reference(h, weight, targets, None, "none")
    assert want.max() > 150
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_token_weights_scale_each_loss(reduction):
    # policy-gradient advantages: any sign, zero on some tokens; value and gradients as the plain path's
    torch.manual_seed(4)
    h = torch.randn(3, 20, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (3, 20))
    targets[1, :4] = -1
    weights = torch.randn(3, 20)
    weights[2, 5:9] = 0
    got = linear_cross_entropy(h, weight, targets, 15.0, reduction, weights=weights)
    got.backward()
    gh, gw = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    want = (reference(h, weight, targets, 15.0, "none") * weights).sum()
    if reduction == "mean":
        want = want / (targets >= 0).sum()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- the C++ kernel of compiled runs


@pytest.mark.parametrize("softcap", [15.0, 30.0])  # a fixed shift up to cap 20, the row's maximum above
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cpu_kernel_matches_the_logits_path(reduction, softcap):
    assert cpu_loss_kernel.load() is not None, "the C++ loss kernel did not build (see the warning above)"
    torch.manual_seed(5)
    h = (torch.randn(3, 23, 16) * 4).requires_grad_()  # logits far into the cap's flat part too
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (3, 23))
    targets[0, :5] = -1
    got = linear_cross_entropy(h, weight, targets, softcap, reduction, cpu_kernel=True)
    (got * 1.7).backward()
    # against the exact (float64) logits path: float32 rounding, relative to each quantity's scale
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = reference(h64, w64, targets, softcap, reduction)
    (want * 1.7).backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for grad, exact in ((h.grad, h64.grad), (weight.grad, w64.grad)):
        torch.testing.assert_close(grad.double(), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())
    assert h.grad[0, :5].abs().max() == 0


def test_cpu_kernel_in_bfloat16_rounds_like_the_torch_ops():
    # the kernel writes the bfloat16 gradient itself: within one bfloat16 rounding of the torch ops'
    torch.manual_seed(6)
    logits = (torch.randn(40, 777) * 20).bfloat16()
    targets = torch.randint(0, 777, (40,))
    by_torch, by_kernel = logits.clone(), logits.clone()
    want = fused_loss._block_losses_(by_torch, targets, 15.0)
    got = fused_loss._block_losses_(by_kernel, targets, 15.0, cpu_kernel=True)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_kernel.float(), by_torch.float(), rtol=2 ** -7, atol=1e-6)
    assert not torch.equal(by_kernel, logits)  # overwritten with the gradient
    logits[3, 10] = float("nan")  # a diverged run stays visible: its loss is NaN, as with the torch ops
    assert fused_loss._block_losses_(logits, targets, 15.0, cpu_kernel=True)[3].isnan()


def test_without_the_cpu_kernel_the_torch_ops_run_and_say_why(monkeypatch, caplog):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++: not found\nmore lines")
    cpu_loss_kernel.load.cache_clear()
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    torch.manual_seed(7)
    h, weight = torch.randn(2, 9, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 9))
    try:
        with caplog.at_level("WARNING"):
            got = linear_cross_entropy(h, weight, targets, 15.0, "none", cpu_kernel=True)
    finally:
        cpu_loss_kernel.load.cache_clear()  # the next test builds (or finds) the real one again
    torch.testing.assert_close(got, reference(h, weight, targets, 15.0, "none"))
    assert "g++: not found" in caplog.text and "pip install ninja" in caplog.text
