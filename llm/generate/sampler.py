"""BatchSampler: one next token per row of a DecodeBatch, each row with its own Sampling settings.

Built once per batch layout (DecodeBatch.admit), so the per-row settings become tensors once, not at
every step. Greedy rows (temperature below GREEDY_BELOW) take the argmax; the others are sampled at
their temperature after their top-k / top-p cuts, seeded rows from their own torch.Generator.

Sampling is robust to any temperature the settings allow: the logits are shifted so that the best is 0
before the division, so a small temperature sends the others towards -inf (probability 0) and never
overflows to nan. A sampled row whose logits are themselves not finite gets -1, for DecodeBatch to fail
that row alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.generate.sampling import GREEDY_BELOW, Sampling


class BatchSampler:
    def __init__(self, settings: Sequence[Sampling], rngs: Sequence[torch.Generator | None], device: torch.device):
        greedy = [s.temperature < GREEDY_BELOW for s in settings]
        self.rows = len(settings)
        self.all_greedy = all(greedy)
        self.temps = torch.tensor([1.0 if g else s.temperature for s, g in zip(settings, greedy)],
                                  device=device)[:, None]
        self.unit_temps = all(g or s.temperature == 1 for s, g in zip(settings, greedy))
        self.seeded = [(i, g) for i, g in enumerate(rngs) if g is not None]
        self.is_greedy = torch.tensor(greedy, device=device)
        self.any_greedy = any(greedy)
        self.top_k = [s.top_k for s in settings] if any(s.top_k for s in settings) else None
        self.top_p = (torch.tensor([s.top_p or 1.0 for s in settings], device=device)[:, None]
                      if any(s.top_p is not None and s.top_p < 1 for s in settings) else None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) logits -> (rows,) token ids (-1: a sampled row with non-finite logits)."""
        if self.all_greedy:
            return logits.argmax(dim=-1)
        x = logits - logits.amax(dim=-1, keepdim=True)  # <= 0, so dividing by any temperature cannot overflow
        if not self.unit_temps:
            x = x / self.temps
        if self.top_k is not None:
            k = torch.tensor([min(k or 0, x.size(1)) for k in self.top_k], device=x.device)
            kth = x.topk(int(k.max()), dim=-1).values.gather(1, (k.clamp(min=1) - 1)[:, None])
            x = x.masked_fill((x < kth) & (k[:, None] > 0), float("-inf"))  # k = 0: this row has no cut
        if self.top_p is not None:
            sorted_x, order = x.sort(dim=-1, descending=True)
            probs = sorted_x.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > self.top_p  # keep the smallest set reaching top_p
            x = x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))
        # Inverse-CDF sampling: one uniform number per row, where torch.multinomial would draw one per
        # vocabulary entry (~20x slower at 32k tokens). The CDF is left unnormalised (the uniform is
        # scaled to each row's total instead). A token of probability 0 is never picked. The best token
        # survives every cut, so x still peaks at 0 and each total is >= 1 (nan if a logit was nan).
        cdf = x.exp_().cumsum_(dim=-1)
        u = torch.rand(self.rows, 1, device=x.device)
        if self.seeded:  # a seeded row draws from its own generator
            rows, rngs = zip(*self.seeded)
            u[list(rows), 0] = torch.cat([torch.rand(1, generator=g, device=x.device) for g in rngs])
        total = cdf[:, -1:]
        u = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))  # strictly below the total
        out = torch.searchsorted(cdf, u, right=True)[:, 0].masked_fill_(~(total[:, 0] > 0), -1)
        if self.any_greedy:
            out = torch.where(self.is_greedy, logits.argmax(dim=-1), out)
        return out
