"""BatchSampler: per-row temperature, top-k and top-p sampling that no temperature can break."""

from __future__ import annotations

import torch

from llm.generate.sampler import BatchSampler
from llm.generate.sampling import GREEDY_BELOW, Sampling


def sampler(n: int, **settings) -> BatchSampler:
    return BatchSampler([Sampling(1, **settings)] * n, [None] * n, torch.device("cpu"))


def test_sampler_follows_the_distribution():
    """Inverse-CDF sampling: frequencies match softmax(logits / T), top-k keeps only the k best."""
    torch.manual_seed(0)  # the unseeded rows draw from the global generator
    logits = torch.full((4000, 8), -30.0)
    logits[:, :3] = torch.tensor([0.0, 1.0, 2.0])
    freq = torch.bincount(sampler(4000, temperature=1.0)(logits), minlength=8) / 4000
    torch.testing.assert_close(freq[:3], torch.tensor([0.0, 1.0, 2.0]).softmax(0), atol=0.03, rtol=0)
    assert freq[3:].sum() == 0
    freq = torch.bincount(sampler(4000, temperature=1.0, top_k=2)(logits), minlength=8) / 4000
    assert freq[0] == 0 and abs(freq[2] - 1 / (1 + torch.e ** -1)) < 0.03
    freq = torch.bincount(sampler(4000, temperature=0.5)(logits), minlength=8) / 4000
    torch.testing.assert_close(freq[:3], torch.tensor([0.0, 2.0, 4.0]).softmax(0), atol=0.03, rtol=0)


def test_small_temperatures_above_the_threshold_sample_without_overflow():
    """Dividing the shifted logits (best = 0) can only push the others to -inf, never to nan, even with
    logits far beyond the soft-cap."""
    logits = torch.tensor([[1e36, -1e36, 0.0, 1e36 * (1 - 1e-5)]] * 200)  # / 2e-5 would overflow float32
    out = sampler(200, temperature=2 * GREEDY_BELOW)(logits)
    assert set(out.tolist()) <= {0, 3} and (out >= 0).all()
    assert set(sampler(200, temperature=1.0, top_p=1e-300)(logits).tolist()) <= {0, 3}


def test_non_finite_logits_fail_only_the_sampled_row_they_belong_to():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0], [float("inf"), 0.0, 0.0]])
    settings = [Sampling(1, temperature=1.0, top_k=2), Sampling(1, temperature=0.7), Sampling(1, temperature=1.0)]
    out = BatchSampler(settings, [None] * 3, torch.device("cpu"))(logits).tolist()
    assert out[0] in (1, 2) and out[1:] == [-1, -1]
