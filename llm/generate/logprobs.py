"""Log-probabilities as OpenAI's `logprobs` report them: of each token, and of the most likely alternatives.

They are the log_softmax of the same float32 logits the engine samples from (after the model's soft-cap,
before temperature and the top-k / top-p cuts), so they describe the model, not one sampling setting.

    prompt_logprobs(model, ids, top)     every prompt token given the tokens before it (scoring, echo)
    step_logprobs(logits, tokens, tops)  one decode step's tokens, one row each (DecodeBatch.step)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from llm.model.gpt import GPT

# What a token the model rules out entirely reports instead of -inf, which JSON cannot carry (OpenAI's value).
IMPOSSIBLE = -9999.0


class TokenLogprob(NamedTuple):
    """A token's log-probability and the `top` most likely tokens at its position, best first."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def step_logprobs(logits: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """(rows, vocab) logits, each row's token and how many alternatives it wants -> one TokenLogprob per row."""
    logprobs = logits.log_softmax(dim=-1).nan_to_num_(nan=IMPOSSIBLE, neginf=IMPOSSIBLE)  # in place: one copy
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = min(max(tops, default=0), logits.size(-1))
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    return [TokenLogprob(t, lp, list(zip(i[:n], v[:n]))) for t, lp, i, v, n in zip(tokens, chosen, ids, values, tops)]


@torch.inference_mode()
def prompt_logprobs(model: GPT, ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """One entry per prompt token: None for the first (nothing comes before it), then each token's
    log-probability given the ones before it. One forward of the whole prompt, no cache."""
    device = model.lm_head.weight.device
    logits = model(torch.tensor([list(ids)], device=device))[0, :-1]
    return [None, *step_logprobs(logits, ids[1:], [top] * (len(ids) - 1))]
