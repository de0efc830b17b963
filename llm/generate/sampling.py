"""How to sample: one settings type for the engine, RL rollouts, evaluation, the CLI and the server.

    Sampling(max_tokens=256, temperature=0.6, top_k=50)             one answer, as the chat CLI asks
    Sampling(max_tokens=128, temperature=1.0, top_k=50, num_samples=8, seed=7)   an RL group

The values a run uses come from its YAML (conf/stage/rl.yaml, conf/eval.yaml, conf/chat.yaml,
conf/serve.yaml); the defaults here are the neutral ones: no cut, one sample, no seed.
`fit_to_context` is the one place that decides how many tokens an answer may take.
"""

from __future__ import annotations

from dataclasses import dataclass

# A reply ends at either of these (yielded and kept in the ids); see llm.generate.engine.
STOP_TOKENS = ("assistant_end", "bos")

# Temperatures below this decode greedily (vLLM's threshold). Sampling at such a temperature could only
# differ from the argmax between logits equal to float32 precision, and 1/temperature would overflow.
GREEDY_BELOW = 1e-5


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Sampling:
    """temperature 0 (or anything below GREEDY_BELOW) is greedy; top_k / top_p None means no cut;
    num_samples answers per prompt; with a seed, answer r of a call samples from its own generator seeded
    with seed + r (reproducible)."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    num_samples: int = 1
    seed: int | None = None

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 1, or None for no cut")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1], or None for no cut")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop={self.stop!r} must be a list of non-empty strings")
        object.__setattr__(self, "stop", stop)  # YAML and JSON give lists
        if not _is_int(self.num_samples) or self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples!r} must be an integer >= 1")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer, or None for unseeded sampling")


def fit_to_context(max_tokens: int, prompt_tokens: int, context: int) -> int:
    """Tokens an answer may take: max_tokens, cut to the positions the prompt leaves in the context
    (0 or less when the prompt fills it)."""
    return min(max_tokens, context - prompt_tokens)
