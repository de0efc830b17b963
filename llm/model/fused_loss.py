"""Cross entropy of the (soft-capped) output layer without materialising the logits.

At small widths the unembedding dominates a step: (B*T, vocab) logits in float32 are read and
written some ten times by the matmul, soft-cap, log-softmax and their backwards (1 GB of traffic
per step at d4, B*T=4096, vocab 32768). Here the rows are processed in chunks that stay in cache:
each chunk's logits are computed, turned into losses *and* into the gradients w.r.t. the hidden
states and the weight, and dropped. Backward then only scales the stored gradients.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 128


def _chunk_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None):
    """(losses, z, tanh) of one chunk; z are the capped logits in float32."""
    z = (h @ weight.T).float()
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return lse - picked, z, t, lse


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, token_weights, softcap, compute_dtype):
        # h (N, C), weight (V, C), targets (N,), token_weights (N,): the loss is sum_i w_i * loss_i
        with torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(compute_dtype)
            hc = h.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(hc)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for s in range(0, h.size(0), CHUNK_ROWS):
                rows = slice(s, s + CHUNK_ROWS)
                tw = token_weights[rows]
                losses, z, t, lse = _chunk_losses(hc[rows], w, targets[rows], softcap)
                total += (losses * tw).sum()
                g = (z - lse.unsqueeze(1)).exp_()  # softmax
                g.scatter_add_(1, targets[rows].clamp(min=0).unsqueeze(1),
                               -torch.ones_like(tw).unsqueeze(1))  # minus the one-hot target
                if t is not None:
                    g.mul_(1 - t * t)  # through the soft-cap: d(c*tanh(x/c))/dx = 1 - tanh^2
                g.mul_(tw.unsqueeze(1))
                g = g.to(compute_dtype)
                grad_h[rows] = g @ w
                grad_w.add_((g.T @ hc[rows]).float())
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


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of softcap(h @ weight.T) against targets (-1 = ignored).

    h (..., C), targets (...). "mean" over counted targets, "sum", or "none" ((...) losses, 0 where
    ignored; computed chunk by chunk without gradients).
    """
    shape = targets.shape
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    counted = (targets >= 0).float()
    dtype = _compute_dtype(h)
    if reduction == "none":
        with torch.no_grad(), torch.autocast(device_type=h.device.type, enabled=False):
            w = weight.to(dtype)
            losses = torch.cat([_chunk_losses(h[s:s + CHUNK_ROWS].to(dtype), w, targets[s:s + CHUNK_ROWS], softcap)[0]
                                for s in range(0, h.size(0), CHUNK_ROWS)])
        return (losses * counted).view(shape)
    token_weights = counted / counted.sum().clamp(min=1) if reduction == "mean" else counted
    return _LinearCrossEntropy.apply(h, weight, targets, token_weights, softcap, dtype)
