"""Cross entropy of the (soft-capped) output layer, fused with its backward.

At small widths the unembedding dominates a step, and the plain path reads and writes the
(B*T, vocab) float32 logits some ten times (matmul, float cast, soft-cap, log-softmax and their
backwards). Here the rows go through in blocks: one matmul gives a block's logits in the compute
dtype, small chunks of it (which stay in cache) become losses and are overwritten in place by the
gradient of the loss w.r.t. the logits, and two matmuls turn that into the block's share of the
gradients w.r.t. the hidden states and the weight, already in forward. Backward only scales them
by the upstream gradient. One block buffer is reused, so the full logits never exist (at d6,
B*T=16384, they would be 2 GB, and page-faulting a fresh 2 GB every step costs most of a second).
Compiled runs on a CPU hand each block's elementwise work to one C++ kernel instead of the torch
ops below (cpu_loss_kernel.py: same math, two loops per row, ~4x faster).
"""

from __future__ import annotations

import torch

from llm.model import cpu_loss_kernel

# Logits per block: 256 MiB, e.g. 2048 rows of a 32768 vocabulary in float32 or 4096 in bfloat16.
# Big enough for full-speed matmuls and few blocks (each block's weight-gradient product is added
# into a float32 sum); d4 bf16 on CPU: 4096 rows are ~3% faster a step than 2048.
BLOCK_BYTES = 256 * 2**20
CPU_CHUNK_ROWS = 32  # rows per elementwise pass on CPU: 32 x 32768 float32 = 4 MB, stays in cache
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def block_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows of logits per block for this vocabulary and compute dtype."""
    return max(1, BLOCK_BYTES // (vocab * dtype.itemsize))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the low-precision compute dtypes; float64 stays float64 (reference runs)."""
    return torch.promote_types(dtype, torch.float32)


class _Workspace:
    """Scratch rows (float32, or float64 for float64 logits) for the elementwise passes, allocated
    once per block, not per chunk: on CPU a fresh 1 MB tensor per op costs more than the op itself."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        self.s, self.z, self.p = (torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(3))


def _loss_and_dlogits_(x: torch.Tensor, targets: torch.Tensor, softcap: float | None, ws: _Workspace) -> torch.Tensor:
    """Per-row losses of logits x (rows, V) against targets (-1 = ignored, still computed), and x
    overwritten with d loss_row / d x.

    The cap c*tanh(x/c) equals 2c*sigmoid(2x/c) - c: softmax and cross entropy ignore the constant
    shift, and on CPU sigmoid is about 5x faster than tanh. Its slope 1 - tanh^2 is 4s(1 - s).
    """
    n = x.size(0)
    s = x if x.dtype == ws.s.dtype else ws.s[:n].copy_(x)
    if softcap is None:
        z = s
    else:
        s.mul_(2.0 / softcap).sigmoid_()
        z = torch.mul(s, 2.0 * softcap, out=ws.z[:n])
    # the out= variant of softmax writes into the workspace instead of allocating
    p = torch.ops.aten._softmax.out(z, -1, False, out=ws.p[:n])
    # loss = logsumexp(z) - z_target, with logsumexp(z) = max(z) - log max(p): exact even where
    # p_target underflows to 0, since the largest probability is at least 1/V.
    idx = targets.clamp(min=0).unsqueeze(1)
    losses = (z.amax(dim=-1, keepdim=True) - p.amax(dim=-1, keepdim=True).log() - z.gather(1, idx)).squeeze(1)
    p.scatter_add_(1, idx, torch.full_like(idx, -1.0, dtype=p.dtype))  # softmax - one_hot(target)
    if softcap is not None:
        p.mul_(s.addcmul_(s, s, value=-1.0).mul_(4.0))  # through the cap: 4s(1 - s)
    x.copy_(p)  # float32 math, then one cast (a bfloat16 out= on the multiply is ~5x slower)
    return losses


def _chunk_rows(x: torch.Tensor) -> int:
    # On a GPU one elementwise pass over the whole block beats thousands of small kernel launches.
    return CPU_CHUNK_ROWS if x.device.type == "cpu" else x.size(0)


def _block_losses_(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                   cpu_kernel: bool = False) -> torch.Tensor:
    """Per-row losses of a block of logits, which is overwritten with d loss_row / d logits.
    cpu_kernel: on CPU, with a cap, in float32 or bfloat16, use the C++ kernel where it builds."""
    if cpu_kernel and logits.device.type == "cpu" and softcap is not None and logits.dtype in _KERNEL_DTYPES:
        losses = cpu_loss_kernel.capped_cross_entropy_(logits, targets, softcap)
        if losses is not None:
            return losses.to(accumulation_dtype(logits.dtype))
    step = _chunk_rows(logits)
    ws = _Workspace(min(step, logits.size(0)), logits.size(1), accumulation_dtype(logits.dtype), logits.device)
    return torch.cat([_loss_and_dlogits_(logits[s:s + step], targets[s:s + step], softcap, ws)
                      for s in range(0, logits.size(0), step)])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, softcap, compute_dtype, cpu_kernel):
        # h (N, C), weight (V, C), targets (N,), token_weights (N,): the loss is sum_i w_i * loss_i
        with torch.autocast(device_type=h.device.type, enabled=False):
            w, hc = weight.to(compute_dtype), h.to(compute_dtype)
            # the per-token weights scale rows: apply them to the small operand, not to (N, V)
            scale = token_weights.to(compute_dtype).unsqueeze(1)
            h_scaled = hc * scale
            acc = accumulation_dtype(compute_dtype)
            total = torch.zeros((), dtype=acc, device=h.device)
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)
            step = block_rows(w.size(0), compute_dtype)
            block = torch.empty(min(step, h.size(0)), w.size(0), dtype=compute_dtype, device=h.device)
            for s in range(0, h.size(0), step):
                rows = slice(s, s + step)
                logits = torch.mm(hc[rows], w.T, out=block[: hc[rows].size(0)])
                total += (_block_losses_(logits, targets[rows], softcap, cpu_kernel) * token_weights[rows]).sum()
                torch.mm(logits, w, out=grad_h[rows])
                grad_h[rows] *= scale[rows]
                if compute_dtype == acc:
                    grad_w.addmm_(logits.T, h_scaled[rows])
                else:  # matmuls accumulate in float32 inside; the blocks' partial sums add up in float32 here
                    grad_w += logits.T @ h_scaled[rows]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.to(h_dtype) * grad_out, (grad_w * grad_out).to(w_dtype), None, None, None, None, None)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


@torch.no_grad()
def _token_losses(h, weight, targets, softcap, dtype, cpu_kernel) -> torch.Tensor:
    with torch.autocast(device_type=h.device.type, enabled=False):
        w = weight.to(dtype)
        step = block_rows(w.size(0), dtype)
        return torch.cat([_block_losses_(h[s:s + step].to(dtype) @ w.T, targets[s:s + step], softcap, cpu_kernel)
                          for s in range(0, h.size(0), step)])


@torch.compiler.disable  # hand-fused already; tracing its Python loops would unroll thousands of ops
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None, reduction: str = "mean",
                         weights: torch.Tensor | None = None, cpu_kernel: bool = False) -> torch.Tensor:
    """Cross entropy of softcap(h @ weight.T) against targets (-1 = ignored).

    h (..., C), targets (...). "mean" over counted targets, "sum", or "none" ((...) losses, 0 where
    ignored; without gradients). weights (...), for "mean" and "sum": each token's loss is scaled by
    its weight first (any sign, e.g. policy-gradient advantages); they get no gradient.
    cpu_kernel: the elementwise work in one C++ kernel on CPU (llm/model/cpu_loss_kernel.py).
    """
    shape = targets.shape
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    dtype = _compute_dtype(h)
    counted = (targets >= 0).to(accumulation_dtype(dtype))
    if reduction == "none":
        return (_token_losses(h, weight, targets, softcap, dtype, cpu_kernel) * counted).view(shape)
    token_weights = counted if weights is None else counted * weights.detach().reshape(-1).to(counted.dtype)
    if reduction == "mean":
        token_weights = token_weights / counted.sum().clamp(min=1)
    return _LinearCrossEntropy.apply(h, weight, targets, token_weights, softcap, dtype, cpu_kernel)
