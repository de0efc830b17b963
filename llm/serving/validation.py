"""What both OpenAI routes check in a request, in the API process, before anything reaches the model.

Each check answers 400 (api_error) with a message naming the value and `param` naming the field:
text that is not valid Unicode anywhere in the body, fields the response echoes that are too long,
the sampling fields (temperature, top_p, top_k, stop), n, seed and the token budget against the limits
and the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm.generate.sampling import Sampling
from llm.serving.errors import api_error, field_path

INT64 = (-(2 ** 63), 2 ** 63 - 1)  # the seeds OpenAI takes (and torch.Generator.manual_seed)
MAX_STOP_CHARS = 64
# OpenAI's documented limits on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MAX_METADATA = (16, 64, 512)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (values: conf/serve.yaml); anything beyond is a 400 (payload: 413)."""
    max_tokens: int  # per completion
    default_max_tokens: int  # when the request names none (cut to the context left)
    max_n: int
    max_stop: int
    max_payload_bytes: int
    max_prompts: int  # prompts in one /v1/completions request
    max_logprobs: int  # alternatives per token
    max_echo_chars: int  # model and user strings (the response echoes the model)


def _surrogate(text: str) -> str | None:
    """The first lone surrogate in `text` as an escape ("\\ud800"), or None if it is valid Unicode."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return f"\\u{ord(text[e.start]):04x}"


def check_text(body) -> None:
    """Every string of a parsed body, keys too, must be valid Unicode. JSON's \\ud800 escapes can carry a
    lone surrogate, which can be neither tokenized nor written back as UTF-8."""
    stack = [((), body)]
    while stack:  # iterative: a deeply nested body must not overflow the stack
        path, value = stack.pop()
        if isinstance(value, str):
            bad = _surrogate(value)
            if bad:
                where = field_path(path) or "the body"
                raise api_error(400, f"{where} is not valid text: it holds the lone surrogate {bad}; send "
                                     f"well-formed Unicode (a surrogate pair, or the character itself)", where)
        elif isinstance(value, dict):
            stack.extend((path + (k,), k) for k in value)
            stack.extend((path + (k,), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))


def check_echoed(model: str | None, user: str | None, metadata: dict | None, limits: Limits) -> None:
    """Bound what the response echoes (model) or a log would keep (user, metadata)."""
    for name, value in (("model", model), ("user", user)):
        if value is not None and len(value) > limits.max_echo_chars:
            raise api_error(400, f"{name} is {len(value)} characters; at most {limits.max_echo_chars}", name)
    pairs, key_chars, value_chars = MAX_METADATA
    if metadata and (len(metadata) > pairs or any(len(k) > key_chars or len(v) > value_chars
                                                  for k, v in metadata.items())):
        raise api_error(400, f"metadata takes at most {pairs} pairs, keys of <= {key_chars} characters and values "
                             f"of <= {value_chars}", "metadata")


def check_n(n: int | None, limits: Limits) -> int:
    n = 1 if n is None else n
    if not 1 <= n <= limits.max_n:
        raise api_error(400, f"n={n} must be between 1 and {limits.max_n}", "n")
    return n


def check_seed(seed: int | None) -> int | None:
    if seed is not None and not INT64[0] <= seed <= INT64[1]:
        raise api_error(400, f"seed={seed} must be a 64-bit integer, between {INT64[0]} and {INT64[1]}", "seed")
    return seed


def token_budget(asked: int | None, name: str, prompt_tokens: int, context: int, limits: Limits,
                 lowest: int = 1) -> int:
    """Tokens a completion may take: `asked` (the field `name`), or the default cut to the context left."""
    room = context - prompt_tokens
    if asked is None:
        return min(limits.default_max_tokens, room)
    if not lowest <= asked <= limits.max_tokens:
        raise api_error(400, f"{name}={asked} must be between {lowest} and {limits.max_tokens}", name)
    if asked > room:
        raise api_error(400, f"the prompt ({prompt_tokens} tokens) + {name}={asked} exceeds the model's context "
                             f"of {context} tokens; ask for at most {room}", name, "context_length_exceeded")
    return asked


def sampling(request, max_tokens: int, limits: Limits, defaults: dict) -> Sampling:
    """The Sampling of a request's temperature / top_p / top_k / stop. Not given: the server's defaults
    (temperature, top_k); an explicit null temperature is OpenAI's 1, an explicit null top_k no cut."""
    given = request.model_fields_set
    temperature = request.temperature if "temperature" in given else defaults["temperature"]
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= 2:  # nan too
        raise api_error(400, f"temperature={temperature} must be between 0 and 2", "temperature")
    top_p = None if request.top_p in (None, 1) else request.top_p
    top_k = request.top_k if "top_k" in given else defaults["top_k"]
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > limits.max_stop or not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise api_error(400, f"stop takes at most {limits.max_stop} non-empty strings of <= {MAX_STOP_CHARS} "
                             f"characters", "stop")
    try:
        return Sampling(max_tokens, temperature, top_k, top_p, tuple(stop))
    except ValueError as e:  # Sampling's messages start with the field: "top_p=0.0 must be in (0, 1], ..."
        raise api_error(400, str(e), str(e).partition("=")[0]) from None
