"""Generator: batched sampling on the static KV cache, streaming, and the calculator tool.

One decoding core serves the CLI, evaluation, RL rollouts and the server:

    DecodeBatch   rows that decode together on one KVCache. `admit(rows)` prefills new prompts
                  (each distinct prompt once, so num_samples rows share one prefill) and rebuilds
                  the cache with the rows still running, right-aligned (left padding); `step()`
                  runs one forward for every row, samples, and applies tool forcing and stops.
    Generator     the user-facing API: generate() streams steps, generate_batch() collects them,
                  complete() is text in, text out.

Text: every row carries a TextStream (llm/generate/text_stream.py) that turns its tokens into display text
and detects stop strings.

Rows keep the prompt's last token out of the prefill and feed it in the first step, so a new
prompt and a running row look the same to step(): each has one `next_input` token. Finished rows
stay in the batch (fed a dummy token) until at least half are finished; then the cache is rebuilt
without them, so long-running rows don't pay for dead ones.

A row stops at assistant_end or bos (the stop token is yielded and kept in the ids), at a stop
string (TextStream sees it in the display text), or after max_tokens tokens (forced ones count).
Tool use: the tokens between python_start and python_end are decoded and run by `tool`
(llm.generate.calculator.calculate by default, which answers "Error: ..." on refused input); its answer is
forced in as output_start + text + output_end, one token per step, marked forced. Whatever the tool
returns is made encodable first (a lone surrogate becomes U+FFFD), and a tool that raises answers
"Error: ...", so no tool result can stop a row.

One row's trouble stays in its row: a row whose sampling distribution is not finite, or whose token
cannot be processed, finishes with finish="error" (and `error` saying why) while the others go on;
Generator.generate raises it, the server answers that one request with an error.

A row created with logprobs=k records each token's log-probability and its k best alternatives
(llm/generate/logprobs.py) in `logprobs_out`; only then does a step compute a log_softmax.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from llm.generate.calculator import calculate
from llm.generate.logprobs import TokenLogprob, prompt_logprobs, step_logprobs
from llm.generate.prepare import DecodeHead
from llm.generate.sampler import BatchSampler
from llm.generate.sampling import STOP_TOKENS, Sampling, fit_to_context
from llm.generate.text_stream import TextStream, display_pieces
from llm.model.gpt import GPT
from llm.model.kv_cache import KVCache
from llm.tokenizer import Tokenizer
PREFILL_LOGITS = 1 << 26  # float32 logits one prefill forward may produce (256 MB)


class Token(NamedTuple):
    """One new token of one row: finish is None while the row runs, else "stop" or "length"."""
    row: int
    token: int
    forced: bool
    finish: str | None


@dataclass
class Row:
    """One sequence being generated: its prompt, its settings, what it produced so far."""
    key: Any
    prompt: list[int]
    sampling: Sampling
    text: TextStream
    rng: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    finish: str | None = None
    pending: deque = field(default_factory=deque)  # tool output waiting to be forced in
    tool_call: list[int] | None = None  # tokens since python_start, while inside a call
    cached: int = 0  # tokens of this row held in the KV cache
    next_input: int = 0
    logprobs: int | None = None  # record each token's log-probability with this many alternatives (None: don't)
    logprobs_out: list[tuple[int, TokenLogprob]] = field(default_factory=list)  # (text offset, logprob), untaken
    error: str | None = None  # why the row failed (finish == "error")

    @property
    def remaining(self) -> int:
        return self.sampling.max_tokens - len(self.tokens)


class DecodeBatch:
    """Rows decoding together on one KV cache; see the module docstring."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, tool: Callable[[str], str] | None = calculate):
        self.model, self.tokenizer, self.tool = model, tokenizer, tool
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        sid = tokenizer.special_id
        self._stop_ids = {sid(name) for name in STOP_TOKENS}
        self._python_start, self._python_end = sid("python_start"), sid("python_end")
        self._output_start, self._output_end = sid("output_start"), sid("output_end")
        self._device = model.lm_head.weight.device

    @property
    def live(self) -> int:
        return sum(r.finish is None for r in self.rows)

    def cancel(self, key: Any) -> bool:
        """Stop the running row with this key (its client went away); False if there is none."""
        for r in self.rows:
            if r.key == key and r.finish is None:
                r.finish = "cancelled"
                return True
        return False

    def fits(self, rows: Sequence[Row]) -> bool:
        """Whether admitting `rows` keeps the rebuilt cache within the model's positions."""
        running = [r for r in self.rows if r.finish is None] + list(rows)
        return self._cache_len(running)[1] <= self.model.max_positions

    @staticmethod
    def _cache_len(rows: Sequence[Row]) -> tuple[int, int]:
        """(slot where the next step writes, cache length that lets every row run to max_tokens)."""
        aligned = max(r.cached for r in rows)
        return aligned, aligned + max(r.remaining for r in rows)

    @torch.inference_mode()
    def admit(self, new_rows: Sequence[Row]) -> None:
        """Prefill the new rows' prompts and rebuild the cache holding them and the running rows."""
        source = self._prefill(new_rows)
        running = [r for r in self.rows if r.finish is None]
        rows = running + list(new_rows)
        if not rows:
            self.rows, self.cache = [], None
            return
        aligned, length = self._cache_len(rows)
        cache = self.model.make_kv_cache(len(rows), length, dtype=self.cache.dtype if self.cache else None)
        cache.set_left_padding([aligned - r.cached for r in rows])
        # Copy each row's cached span so that it ends at slot `aligned`, where the next step writes.
        copies = [(self.cache, i) for i, r in enumerate(self.rows) if r.finish is None]
        copies += [source.get(tuple(r.prompt[:-1]), (None, 0)) for r in new_rows]
        for dst, (r, (src, i)) in enumerate(zip(rows, copies)):
            if r.cached:
                end = src.pos
                for src_t, dst_t in ((src.k, cache.k), (src.v, cache.v)):
                    dst_t[:, dst, :, aligned - r.cached:aligned] = src_t[:, i, :, end - r.cached:end]
        cache.advance(aligned)
        self.rows, self.cache = rows, cache
        self._sampler = BatchSampler([r.sampling for r in rows], [r.rng for r in rows], self._device)
        self._logprobs = any(r.logprobs is not None for r in rows)

    def _prefill(self, rows: Sequence[Row]) -> dict[tuple, tuple[KVCache, int]]:
        """Run every distinct prompt (minus its last token) once: prompt -> (its cache, row in it).

        Prompts go left-padded in chunks, longest first, each chunk's (rows x width x vocab) float32
        logits kept under PREFILL_LOGITS: the logits are thrown away, and unless lm_head is a
        DecodeHead (which then computes the last position only) the forward makes all of them.
        """
        prompts = sorted({tuple(r.prompt[:-1]) for r in rows if r.cached}, key=len, reverse=True)
        budget = max(1, PREFILL_LOGITS // self.model.config.vocab_size)
        source: dict[tuple, tuple[KVCache, int]] = {}
        while prompts:
            width = len(prompts[0])
            chunk, prompts = prompts[:max(1, budget // width)], prompts[max(1, budget // width):]
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
            cache = self.model.make_kv_cache(len(chunk), width)
            cache.set_left_padding([width - len(p) for p in chunk])
            head = self.model.lm_head
            try:
                if isinstance(head, DecodeHead):
                    head.last_only = True
                self.model(ids.to(self._device), kv_cache=cache)
            finally:
                if isinstance(head, DecodeHead):
                    head.last_only = False
            source.update((p, (cache, i)) for i, p in enumerate(chunk))
        return source

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int, bool]]:
        """One token for every running row: (row, token, forced) in row order. A row that fails here
        finishes with finish="error" and the others go on (see the module docstring)."""
        ids = torch.tensor([[r.next_input] for r in self.rows], device=self._device)
        logits = self.model(ids, kv_cache=self.cache)[:, -1, :]
        sampled = self._sampler(logits).tolist()
        events = []
        for i, (r, token) in enumerate(zip(self.rows, sampled)):
            if r.finish is not None:
                continue
            r.cached += 1
            forced = bool(r.pending)
            if forced:
                token = r.pending.popleft()
            events.append((i, r, token, forced))
        if self._logprobs:
            self._record_logprobs(logits, events)
        for _, r, token, forced in events:
            try:
                if token < 0:
                    raise FloatingPointError("the row's sampling distribution is not finite (nan logits)")
                self._append(r, token, forced)
            except Exception as e:  # this row's trouble, not the batch's
                r.finish, r.error = "error", f"{type(e).__name__}: {e}"
        if 2 * self.live <= len(self.rows) and self.live < len(self.rows):  # half are finished: drop them
            self.admit([])
        return [(r, token, forced) for _, r, token, forced in events]

    @staticmethod
    def _record_logprobs(logits: torch.Tensor, events: list[tuple[int, Row, int, bool]]) -> None:
        """Each asking row's token log-probability (forced tokens too: the model's view of them), with the
        offset in its display text where the token's text starts."""
        asking = [(i, r, token) for i, r, token, _ in events if r.logprobs is not None and token >= 0]
        if not asking:
            return
        rows = torch.tensor([i for i, _, _ in asking], device=logits.device)
        found = step_logprobs(logits[rows], [t for _, _, t in asking], [r.logprobs for _, r, _ in asking])
        for (_, r, _), logprob in zip(asking, found):
            r.logprobs_out.append((r.text.chars, logprob))

    def _append(self, r: Row, token: int, forced: bool) -> None:
        r.tokens.append(token)
        r.forced.append(forced)
        r.next_input = token
        r.text.push(token)
        if token in self._stop_ids and not forced:
            r.finish = "stop"
        elif token == self._python_start:
            r.tool_call = []
        elif token == self._python_end and r.tool_call is not None:
            expr, r.tool_call = self.tokenizer.decode(r.tool_call), None
            if self.tool is not None:
                r.pending.extend([self._output_start, *self._tool_output(expr), self._output_end])
        elif r.tool_call is not None:
            r.tool_call.append(token)
        if r.finish is None and r.text.stopped:
            r.finish = "stop"
        elif r.finish is None and r.remaining <= 0:
            r.finish = "length"
        if r.finish is not None:
            r.text.finish()

    def _tool_output(self, expr: str) -> list[int]:
        """The tool's answer as ids. Any text is made encodable first: sentencepiece refuses a lone
        surrogate (a string literal such as '\\ud800' evaluates to one), so surrogates that pair up are
        joined and the others become U+FFFD. A tool that raises or answers a non-str answers "Error: ..."."""
        try:
            result = self.tool(expr)
            if not isinstance(result, str):
                result = f"Error: the tool answered {type(result).__name__}, not text"
        except Exception as e:
            result = f"Error: {type(e).__name__}"
        return self.tokenizer.encode(result.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))


class Generator:
    """Sampling from a GPT with its tokenizer: streaming, batched, with the calculator tool.

    max_rows caps how many rows decode at once (memory); more rows wait and join as others finish.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, tool: Callable[[str], str] | None = calculate,
                 max_rows: int | None = None):
        if model.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(f"the model has {model.config.vocab_size} token ids but the tokenizer "
                             f"{tokenizer.vocab_size}: load both from the same artifact")
        self.model, self.tokenizer, self.tool, self.max_rows = model, tokenizer, tool, max_rows
        self.context = model.config.sequence_len
        self.pieces = display_pieces(tokenizer, model.config.vocab_size)

    def check_prompt(self, prompt: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError unless `prompt` is a non-empty list of valid ids that fits with max_tokens."""
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not prompt:
            raise ValueError(f"a prompt must be a non-empty list of token ids, got {str(prompt)[:60]!r}")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ValueError(f"prompt has invalid token ids {bad[:5]}; ids lie in [0, {self.tokenizer.vocab_size})")
        if fit_to_context(max_tokens, len(prompt), self.context) < max_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens={max_tokens} = "
                             f"{len(prompt) + max_tokens} exceeds the model's context of {self.context} tokens; "
                             f"shorten the prompt or ask for at most {max(self.context - len(prompt), 0)} tokens")

    def new_row(self, key: Any, prompt: Sequence[int], sampling: Sampling, seed: int | None = None,
                logprobs: int | None = None) -> Row:
        """A validated row, ready to be admitted to a DecodeBatch; logprobs=k records each token's
        log-probability with its k best alternatives (Row.logprobs_out)."""
        self.check_prompt(prompt, sampling.max_tokens)
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= self.model.config.vocab_size):
            raise ValueError(f"logprobs={logprobs!r} must be a number of alternatives in [0, vocab size], or None")
        rng = None
        if seed is not None:
            rng = torch.Generator(device=self.model.lm_head.weight.device).manual_seed(int(seed))
        return Row(key, list(prompt), sampling, TextStream(self.pieces, sampling.stop), rng,
                   cached=len(prompt) - 1, next_input=prompt[-1], logprobs=logprobs)

    def score(self, prompt: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), with its
        `top` best alternatives: what echo + logprobs report, and what loglikelihood evaluations sum."""
        self.check_prompt(prompt, 0)
        return prompt_logprobs(self.model, prompt, top)

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(self.model, self.tokenizer, self.tool)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling | None = None,
                 **fields) -> Iterator[list[Token]]:
        """Stream generation: yields, once per step, a list with the new Token of every running row.

        `sampling`, or its fields as keywords (num_samples, max_tokens, temperature, top_k, top_p, stop,
        seed). Row r = prompt index * num_samples + sample index. With a seed, row r samples from its own
        torch.Generator seeded with seed + r, so the same call gives the same samples. Arguments are
        checked here, before the first step (ValueError).
        """
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty list of prompts, each a list of token ids")
        if isinstance(prompts[0], int):
            raise ValueError("prompts must be a list of prompts (list of lists of ids); wrap a single prompt: [ids]")
        sampling = _sampling(sampling, fields)
        n, seed = sampling.num_samples, sampling.seed
        rows = [self.new_row(i * n + j, p, sampling, None if seed is None else seed + i * n + j)
                for i, p in enumerate(prompts) for j in range(n)]
        return self._run(rows)

    def _run(self, rows: list[Row]) -> Iterator[list[Token]]:
        waiting, batch = deque(rows), self.new_batch()
        cap = self.max_rows or len(rows)
        while waiting or batch.live:
            if waiting and batch.live < cap:
                batch.admit([waiting.popleft() for _ in range(min(cap - batch.live, len(waiting)))])
            events = batch.step()
            failed = next((r for r, _, _ in events if r.finish == "error"), None)
            if failed is not None:
                raise RuntimeError(f"generation failed for row {failed.key}: {failed.error}")
            yield [Token(r.key, t, f, r.finish) for r, t, f in events]

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling | None = None,
                       **fields) -> list[tuple[list[int], list[bool]]]:
        """All completions at once: per row (order as in generate), the generated ids (no prompt; a final
        assistant_end/bos is included when the row stopped on it) and the forced mask (True = the tool
        wrote it, not the model)."""
        sampling = _sampling(sampling, fields)
        out: list[tuple[list[int], list[bool]]] = [([], []) for _ in range(len(prompts) * sampling.num_samples)]
        for step in self.generate(prompts, sampling):
            for t in step:
                out[t.row][0].append(t.token)
                out[t.row][1].append(t.forced)
        return out

    def to_parts(self, tokens: Sequence[int]) -> list[dict[str, str]]:
        """An assistant turn's tokens as conversation parts (text / python / python_output), so a
        multi-turn chat re-renders its tool calls exactly; stops at assistant_end or bos."""
        sid = self.tokenizer.special_id
        kinds = {sid("python_start"): "python", sid("output_start"): "python_output"}
        ends = {sid("python_end"), sid("output_end")}
        stops = {sid(name) for name in STOP_TOKENS}
        parts: list[tuple[str, list[int]]] = [("text", [])]
        for t in tokens:
            if t in stops:
                break
            if t in kinds or t in ends:
                parts.append((kinds.get(t, "text"), []))
            else:
                parts[-1][1].append(t)
        return [{"type": kind, "text": self.tokenizer.decode(ids)} for kind, ids in parts
                if ids or kind != "text"]

    def complete(self, prompt: str | Sequence[int], sampling: Sampling | None = None, **fields) -> str:
        """Display text of one completion; a str prompt is encoded after a bos token."""
        ids = self.tokenizer.encode(prompt, prepend_bos=True) if isinstance(prompt, str) else list(prompt)
        sampling = _sampling(sampling, fields)
        (tokens, _), = self.generate_batch([ids], sampling)
        text = TextStream(self.pieces, sampling.stop)
        for t in tokens:
            text.push(t)
        text.finish()
        return text.take()


def _sampling(sampling: Sampling | None, fields: dict) -> Sampling:
    if sampling is not None and fields:
        raise ValueError(f"give a Sampling or its fields, not both (got {sorted(fields)} too)")
    return sampling if sampling is not None else Sampling(**fields)


Completions = list[tuple[list[int], list[bool]]]  # (ids, forced) of each sample


def generate_answers(generator, prompts: Sequence[list[int]], sampling: Sampling) -> list[Completions]:
    """sampling.num_samples completions per prompt (RL rollouts, evaluation), each cut to the positions
    its prompt leaves in the context; a prompt that fills the context gets empty ones. Prompts with the
    same budget share a generate_batch call (usually all of them), seeded with sampling.seed + (its
    first prompt's index) * num_samples: with one call, sample s of prompt i gets seed + i * n + s.

    `generator`: a Generator, or anything with its generate_batch and `context` (tests script one)."""
    n = sampling.num_samples
    budgets = [fit_to_context(sampling.max_tokens, len(p), generator.context) for p in prompts]
    answers: list[Completions] = [[([], [])] * n for _ in prompts]
    for budget in sorted({b for b in budgets if b >= 1}):
        members = [i for i, b in enumerate(budgets) if b == budget]
        seed = None if sampling.seed is None else sampling.seed + members[0] * n
        rows = generator.generate_batch([prompts[i] for i in members], replace(sampling, max_tokens=budget, seed=seed))
        for j, i in enumerate(members):
            answers[i] = rows[j * n:(j + 1) * n]
    return answers
