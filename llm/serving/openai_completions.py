"""OpenAI's legacy completions protocol (POST /v1/completions): raw text in, text and logprobs out.

This is what lm-evaluation-harness's `local-completions` backend speaks: a loglikelihood request is
prompt = context + continuation, echo=true, logprobs=1, max_tokens=1 (or 0), temperature=0, and it reads
choices[i].logprobs.token_logprobs[ctxlen:-1]; a generation request is a prompt with max_tokens, stop,
temperature and seed.

prompt: a string, a list of token ids, or a batch of either (a list of strings, a list of lists of ids):
each prompt gets n choices, indexed prompt * n + choice as OpenAI does. A string is encoded after a
<|bos|> token, as every row of our pretraining data starts (and Generator.complete encodes); send
add_special_tokens=false (vLLM's field) for the bare text. Token ids are taken as given: lm-eval sends
its own ids, with bos when it is run with add_bos_token=True.

logprobs=k (0 to limits.max_logprobs): each token's log-probability and its k most likely alternatives,
in OpenAI's shape {"tokens", "token_logprobs", "top_logprobs", "text_offset"}; the chosen token is
in its top_logprobs too (up to k+1 entries, as OpenAI documents). They are the model's own
(llm/generate/logprobs.py), computed in the worker. Tokens are named by their text ("bytes:\\xe2\\x82"
for a piece of a character, "<|bos|>" for a special token). echo=true puts the prompt before the
completion: its text, and with logprobs its tokens (the first has no log-probability: null).
max_tokens=0 is allowed with echo (the prompt is only scored). text_offset counts characters of the
choice's text; generated text is display text, as on the chat route (tool calls shown as <<expr=result>>).

Not supported (400): suffix, best_of > 1, logit_bias.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from llm.serving.errors import api_error, error_of
from llm.serving.openai_chat import Replies, usage
from llm.serving.validation import Limits, check_echoed, check_n, check_seed, check_text, sampling, token_budget
from llm.tokenizer import Tokenizer


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: Any  # str | list[str] | list[int] | list[list[int]], checked by prompts_of with clear messages
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    logprobs: int | None = None
    echo: bool | None = False
    add_special_tokens: bool = True
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None
    logit_bias: dict | None = None


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what echo shows: the string as sent, or the decoded ids
    pieces: list[bytes]  # each token's bytes in `text` (the <|bos|> added to a string shows nothing)


def _is_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def prompts_of(prompt, tokenizer: Tokenizer, add_bos: bool, limits: Limits) -> list[Prompt]:
    """The request's prompts, each checked: 400 naming prompt (or prompt[i]) on anything else."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        batch, names = [prompt], ["prompt"]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(
            isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt)):
        batch, names = prompt, [f"prompt[{i}]" for i in range(len(prompt))]
    else:
        raise api_error(400, f"prompt must be a string, a list of token ids, or a non-empty list of strings or of "
                             f"lists of token ids; got {json.dumps(prompt)[:80]}", "prompt")
    if len(batch) > limits.max_prompts:
        raise api_error(400, f"prompt holds {len(batch)} prompts; at most {limits.max_prompts} per request", "prompt")
    out = []
    for p, name in zip(batch, names):
        if isinstance(p, str):
            ids = tokenizer.encode(p, prepend_bos=add_bos)
            pieces = [tokenizer.decode_bytes([t]) for t in ids]
            if add_bos:
                pieces[0] = b""
            text = p
        else:
            bad = [t for t in p if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise api_error(400, f"{name} has token ids {bad[:5]} outside the vocabulary [0, "
                                     f"{tokenizer.vocab_size})", name)
            ids, pieces = list(p), [tokenizer.decode_bytes([t]) for t in p]
            text = b"".join(pieces).decode("utf-8", errors="replace")
        if not ids:
            raise api_error(400, f"{name} is empty: send at least one token (a string gets <|bos|> unless "
                                 f"add_special_tokens=false)", name)
        out.append(Prompt(ids, text, pieces))
    return out


def completion_jobs(request: CompletionRequest, tokenizer: Tokenizer, context: int, limits: Limits,
                    defaults: dict) -> tuple[list[Prompt], list[dict]]:
    """Validate a request: (its prompts, one worker job per choice, prompt-major)."""
    check_text(request.model_dump())
    check_echoed(request.model, request.user, None, limits)
    for name, unsupported in (("suffix", request.suffix), ("logit_bias", request.logit_bias),
                              ("best_of", request.best_of not in (None, 1))):
        if unsupported:
            raise api_error(400, f"{name} is not supported by this server", name)
    k = request.logprobs
    if k is not None and not 0 <= k <= limits.max_logprobs:
        raise api_error(400, f"logprobs={k} must be between 0 and {limits.max_logprobs}", "logprobs")
    echo = bool(request.echo)
    if request.max_tokens == 0 and not echo:
        raise api_error(400, "max_tokens=0 returns nothing without echo=true", "max_tokens")
    prompts = prompts_of(request.prompt, tokenizer, request.add_special_tokens, limits)
    n, seed = check_n(request.n, limits), check_seed(request.seed)
    jobs = []
    for p in prompts:
        if len(p.ids) > context:
            raise api_error(400, f"a prompt is {len(p.ids)} tokens but the model's context is {context}", "prompt",
                            "context_length_exceeded")
        budget = token_budget(request.max_tokens, "max_tokens", len(p.ids), context, limits, lowest=0 if echo else 1)
        if budget == 0 and not echo:
            raise api_error(400, f"a prompt of {len(p.ids)} tokens fills the model's context of {context}: "
                                 f"nothing is left to complete", "prompt", "context_length_exceeded")
        settings = sampling(request, max(budget, 1), limits, defaults)  # checked even when nothing is sampled
        for _ in range(n):
            choice_seed = None if seed is None else seed + len(jobs)
            jobs.append({"prompt": p.ids, "sampling": settings if budget else None, "seed": choice_seed,
                         "logprobs": k, "score": echo and k is not None})
    return prompts, jobs


def token_strings(tokenizer: Tokenizer) -> list[str]:
    """How logprobs name each token: its text, "bytes:\\x.." when it is not whole characters."""
    names = []
    for i in range(tokenizer.vocab_size):
        piece = tokenizer.decode_bytes([i])
        try:
            names.append(piece.decode("utf-8"))
        except UnicodeDecodeError:
            names.append("bytes:" + "".join(f"\\x{b:02x}" for b in piece))
    return names


def text_offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    """Where each piece's text starts in their decoded concatenation (a split character counts once whole)."""
    decoder, offsets, at = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], start
    for piece in pieces:
        offsets.append(at)
        at += len(decoder.decode(piece))
    return offsets


class Choice:
    """One choice being assembled: add() turns each worker message into (text, logprobs) to append."""

    def __init__(self, prompt: Prompt, echo: bool, logprobs: int | None, names: list[str]):
        self.prompt, self.echo, self.logprobs, self.names = prompt, echo, logprobs, names
        self.started = False
        self.offset = len(prompt.text) if echo else 0  # where generated text starts in the choice's text

    def add(self, msg: dict) -> tuple[str, dict | None]:
        text, entries = msg.get("content", ""), []
        if not self.started:
            self.started = True
            if self.echo:
                text = self.prompt.text + text
                if "prompt_logprobs" in msg:
                    entries += self._prompt_entries(msg["prompt_logprobs"])
        for token, logprob, offset, top in msg.get("logprobs", ()):
            entries.append((token, logprob, self.offset + offset, top))
        return text, (self._block(entries) if self.logprobs is not None else None)

    def _prompt_entries(self, scored: list) -> list:
        offsets = text_offsets(self.prompt.pieces)
        return [(t, None, at, None) if s is None else (t, s[0], at, s[1])
                for t, s, at in zip(self.prompt.ids, scored, offsets)]

    def _block(self, entries: list) -> dict:
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, offset, top in entries:
            block["tokens"].append(self.names[token] if token < len(self.names) else "")
            block["token_logprobs"].append(logprob)
            block["text_offset"].append(offset)
            block["top_logprobs"].append(None if top is None else self._top(token, logprob, top))
        return block

    def _top(self, token: int, logprob: float, top: list) -> dict:
        alternatives: dict[str, float] = {}
        for t, lp in [*top, (token, logprob)]:  # best first; the chosen token is always there
            alternatives.setdefault(self.names[t] if t < len(self.names) else "", lp)
        return alternatives


def _merge(block: dict | None, more: dict | None) -> dict | None:
    if block is None or more is None:
        return block or more
    return {key: block[key] + more[key] for key in block}


def _head(model: str) -> dict:
    return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
            "model": model}


async def stream_completion(model: str, choices: list[Choice], prompt_tokens: int, replies: Replies,
                            include_usage: bool):
    """Server-sent events: one chunk per worker message and choice (text delta, its logprobs, the
    finish_reason on the last), the usage if asked for, [DONE]."""
    head, completion_tokens = _head(model), 0
    try:
        async for i, msg in replies:
            text, logprobs = choices[i].add(msg)
            completion_tokens += msg.get("completion_tokens", 0)
            if text or logprobs and logprobs["tokens"] or msg.get("finish_reason"):
                choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": msg.get("finish_reason")}
                yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, completion_tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # after the 200 went out, an error is an event
        yield f"data: {json.dumps({'error': error_of(e)})}\n\n"


async def complete(model: str, choices: list[Choice], prompt_tokens: int, replies: Replies) -> dict:
    texts, blocks, finish = [[] for _ in choices], [None] * len(choices), ["length"] * len(choices)
    completion_tokens = 0
    async for i, msg in replies:
        text, logprobs = choices[i].add(msg)
        texts[i].append(text)
        blocks[i] = _merge(blocks[i], logprobs)
        if msg.get("finish_reason"):
            finish[i] = msg["finish_reason"]
            completion_tokens += msg["completion_tokens"]
    out = [{"index": i, "text": "".join(t), "logprobs": b, "finish_reason": f}
           for i, (t, b, f) in enumerate(zip(texts, blocks, finish))]
    return {**_head(model), "choices": out, "usage": usage(prompt_tokens, completion_tokens)}
