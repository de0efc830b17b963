"""Cross entropy of the (soft-capped) output layer, fused with its backward.

At small widths the unembedding dominates a step, and the plain path reads and writes the
(B*T, vocab) float32 logits some ten times (matmul, float cast, soft-cap, log-softmax and their
backwards: about 5 GB of memory traffic per step at d4 with B*T=4096 and vocab 32768). Here the
logits are computed once in the compute dtype; small row chunks of them (which stay in cache) are
turned into losses and overwritten in place by the gradient of the loss w.r.t. the logits; two
matmuls then give the gradients w.r.t. the hidden states and the weight, already in forward.
Backward only scales them by the upstream gradient.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 32  # 32 rows x 32768 vocab x 4 bytes = 4 MB of float32 work per chunk


def _capped(x: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(softcap * tanh(x / softcap) in float32, the tanh) or (x in float32, None)."""
    z = x.float()
    if softcap is None:
        return z, None
    t = z.mul_(1.0 / softcap).tanh_()
    return t * softcap, t


def _losses(z: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(z, dim=-1)
    return lse - z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1), lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, softcap, compute_dtype):
        # h (N, C), weight (V, C), targets (N,), token_weights (N,): the loss is sum_i w_i * loss_i
        with torch.autocast(device_type=h.device.type, enabled=False):
            w, hc = weight.to(compute_dtype), h.to(compute_dtype)
            logits = hc @ w.T  # (N, V); becomes d loss_i / d logits in place, chunk by chunk
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, h.size(0), CHUNK_ROWS):
                rows = slice(s, s + CHUNK_ROWS)
                z, t = _capped(logits[rows], softcap)
                losses, lse = _losses(z, targets[rows])
                total += (losses * token_weights[rows]).sum()
                g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax
                g.scatter_add_(1, targets[rows].clamp(min=0).unsqueeze(1), torch.full_like(lse, -1.0).unsqueeze(1))
                if t is not None:
                    g.mul_(t.mul_(t).neg_().add_(1.0))  # through the cap: d(c tanh(x/c))/dx = 1 - tanh^2
                logits[rows] = g
            # the per-token weights scale rows: apply them to the small operands, not to (N, V)
            scale = token_weights.to(compute_dtype).unsqueeze(1)
            grad_h = (logits @ w) * scale
            grad_w = (logits.T @ (hc * scale)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h.to(h_dtype) * grad_out, (grad_w * grad_out).to(w_dtype), None, None, None, None)


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    device = h.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype


@torch.no_grad()
def _token_losses(h, weight, targets, softcap, dtype) -> torch.Tensor:
    with torch.autocast(device_type=h.device.type, enabled=False):
        logits = h.to(dtype) @ weight.to(dtype).T
        return torch.cat([_losses(_capped(logits[s:s + CHUNK_ROWS], softcap)[0], targets[s:s + CHUNK_ROWS])[0]
                          for s in range(0, h.size(0), CHUNK_ROWS)])


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of softcap(h @ weight.T) against targets (-1 = ignored).

    h (..., C), targets (...). "mean" over counted targets, "sum", or "none" ((...) losses, 0 where
    ignored; without gradients).
    """
    shape = targets.shape
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    counted = (targets >= 0).float()
    dtype = _compute_dtype(h)
    if reduction == "none":
        return (_token_losses(h, weight, targets, softcap, dtype) * counted).view(shape)
    token_weights = counted / counted.sum().clamp(min=1) if reduction == "mean" else counted
    return _LinearCrossEntropy.apply(h, weight, targets, token_weights, softcap, dtype)
