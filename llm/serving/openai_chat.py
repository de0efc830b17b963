"""The OpenAI chat-completions protocol on top of LitServe's OpenAISpec.

Everything about a request happens here, in the API process, before anything reaches the model:
the API key, the messages (roles, text-only content, alternation), the sampling fields and their
limits, and the prompt's fit in the model's context. A bad request is answered 4xx with an
OpenAI-style JSON error ({"error": {"message", "type", "param", "code"}}) and never disturbs the
requests being served. A good one becomes a job (prompt ids + Sampling + seed) per choice, queued
for the inference worker; its answers come back as JSON messages and are reassembled into OpenAI
chunks (stream=true) or one completion, each choice with its own finish_reason.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from fastapi import BackgroundTasks, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.openai import (ChatCompletionRequest, ChatCompletionResponse, ChatCompletionResponseChoice,
                                   OpenAISpec, UsageInfo)
from litserve.utils import LitAPIStatus, PickleableHTTPException, ResponseBufferItem

from llm.artifact import read_meta
from llm.generate.engine import Sampling
from llm.tokenizer import Tokenizer


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; anything beyond is a 400 (payload size: 413)."""
    max_tokens: int = 1024  # per completion
    default_max_tokens: int = 256  # when the request names none (cut to the context left)
    max_n: int = 8
    max_stop: int = 4
    max_payload_bytes: int = 1_000_000


class ChatRequest(ChatCompletionRequest):
    """OpenAI's request plus the fields LitServe's model lacks."""
    seed: int | None = None
    top_k: int | None = None
    stream_options: dict | None = None  # {"include_usage": true} adds a final chunk with the usage


def api_error(status: int, message: str, param: str | None = None, code: str | None = None) -> HTTPException:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return HTTPException(status, {"message": message, "type": kind, "param": param, "code": code})


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """401 unless `authorization` is "Bearer <expected>" (nothing to check when no key is set)."""
    if expected is None:
        return
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), expected.encode()):
        raise api_error(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key")


def message_text(i: int, content) -> str:
    """A message's text: a str, or OpenAI's list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(getattr(part, "type", None) == "text" for part in content):
            return "".join(part.text for part in content)
        raise api_error(400, f"messages[{i}]: only text content is supported", f"messages[{i}].content")
    raise api_error(400, f"messages[{i}] has no content", f"messages[{i}].content")


def to_job(request: ChatRequest, tokenizer: Tokenizer, context: int, limits: Limits,
           defaults: dict) -> dict:
    """Validate a request and turn it into what the worker runs: prompt ids, Sampling, seed, n."""
    if not request.messages:
        raise api_error(400, "messages is empty: send at least one user message", "messages")
    if request.tools:
        raise api_error(400, "tools are not supported by this model (it has a built-in calculator)", "tools")
    messages = []
    for i, m in enumerate(request.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise api_error(400, f"messages[{i}] has role {m.role!r}; valid roles: system, user, assistant",
                            f"messages[{i}].role")
        messages.append({"role": role, "content": message_text(i, m.content)})
    if messages[-1]["role"] != "user":
        raise api_error(400, "the last message must be the user's (the model writes the next assistant turn)",
                        "messages")
    try:
        prompt = tokenizer.render_for_completion({"messages": messages})
    except ValueError as e:
        raise api_error(400, str(e), "messages") from None
    n = request.n if request.n is not None else 1
    if not 1 <= n <= limits.max_n:
        raise api_error(400, f"n={n} must be between 1 and {limits.max_n}", "n")
    room = context - len(prompt)
    if room < 1:
        raise api_error(400, f"the prompt is {len(prompt)} tokens but the model's context is {context}: "
                             f"shorten the conversation", "messages", "context_length_exceeded")
    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise api_error(400, f"max_tokens={max_tokens} must be between 1 and {limits.max_tokens}", "max_tokens")
    elif max_tokens > room:
        raise api_error(400, f"the prompt ({len(prompt)} tokens) + max_tokens={max_tokens} exceeds the model's "
                             f"context of {context} tokens; ask for at most {room}", "max_tokens",
                        "context_length_exceeded")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > limits.max_stop or not all(0 < len(s) <= 64 for s in stop):
        raise api_error(400, f"stop takes at most {limits.max_stop} non-empty strings of <= 64 characters", "stop")
    given = request.model_fields_set
    temperature = request.temperature if "temperature" in given else defaults["temperature"]
    temperature = 1.0 if temperature is None else temperature
    if not 0 <= temperature <= 2:
        raise api_error(400, f"temperature={temperature} must be between 0 and 2", "temperature")
    top_p = request.top_p if "top_p" in given else None
    top_k = request.top_k if "top_k" in given else defaults["top_k"]
    try:
        sampling = Sampling(max_tokens, temperature, top_k, None if top_p == 1 else top_p, tuple(stop))
    except ValueError as e:
        raise api_error(400, str(e), "top_p" if "top_p" in str(e) else "top_k") from None
    return {"prompt": prompt, "sampling": sampling, "seed": request.seed, "n": n}


class ChatSpec(OpenAISpec):
    """LitServe's OpenAI spec, with our validation, seeds per choice and finish reasons."""

    def __init__(self, folder: Path, limits: Limits, defaults: dict, model_name: str):
        super().__init__()
        self.folder, self.limits, self.defaults, self.model_name = folder, limits, defaults, model_name

    def pre_setup(self, lit_api) -> None:
        self.add_endpoint(self.api_path, self.chat_completion, ["POST"])
        self.add_endpoint(self.api_path, self.options_chat_completions, ["OPTIONS"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def setup(self, server) -> None:
        super().setup(server)
        self.tokenizer = Tokenizer.load(self.folder)
        self.context = int(read_meta(self.folder)["model"]["sequence_len"])

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanochat-lightning"}]}

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks):
        job = to_job(request, self.tokenizer, self.context, self.limits, self.defaults)
        pipes, uids = [], []
        for i in range(job["n"]):  # n choices = n rows; the worker prefills the shared prompt once
            uid = uuid.uuid4()
            q, event = deque(), asyncio.Event()
            self.response_buffer[uid] = ResponseBufferItem(response_queue=q, event=event)
            seed = None if job["seed"] is None else job["seed"] + i
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(),
                                    {"prompt": job["prompt"], "sampling": job["sampling"], "seed": seed}))
            pipes.append(self.data_streamer(q, event, send_status=True))
            uids.append(uid)
        model = request.model or self.model_name
        if request.stream:
            usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._stream(model, pipes, uids, usage), media_type="text/event-stream",
                                     background=background_tasks)
        return await self._complete(model, pipes, uids)

    async def _messages(self, pipes, uids):
        """(choice index, message dict) from all choices as they arrive; raises on a worker error."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, pipe):
            try:
                async for data, status in pipe:
                    await merged.put((i, data, status))
            finally:
                await merged.put((i, None, None))

        tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(pipes)]
        ended: set[int] = set()
        try:
            open_pipes = len(pipes)
            while open_pipes:
                i, data, status = await merged.get()
                if status is None:
                    open_pipes -= 1
                    ended.add(i)
                elif status == LitAPIStatus.ERROR:
                    raise data if isinstance(data, HTTPException) else api_error(500, "generation failed")
                else:
                    yield i, json.loads(data)
        finally:
            for t in tasks:
                t.cancel()
            for i, uid in enumerate(uids):
                self.response_buffer.pop(uid, None)
                if i not in ended:  # the client left (or another choice failed): stop generating for it
                    self.request_queue.put((self.response_queue_id, uid, time.monotonic(), {"cancel": True}))

    async def _stream(self, model, pipes, uids, include_usage: bool):
        """OpenAI's server-sent events: a role chunk per choice, content deltas, a finish chunk per
        choice, the usage if asked for, [DONE]. Chunks are written with json.dumps (one per token, so
        the cost matters) in the shape of ChatCompletionChunk."""
        usage = UsageInfo()
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model}

        def chunk(i, delta, finish=None):
            choice = {"index": i, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

        try:
            for i in range(len(pipes)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, msg in self._messages(pipes, uids):
                if msg.get("finish_reason"):
                    usage = _add_usage(usage, msg, first=i == 0)
                    yield chunk(i, {"content": msg["content"]} if msg["content"] else {}, msg["finish_reason"])
                elif msg["content"]:
                    yield chunk(i, {"content": msg["content"]})
            if include_usage:
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage.model_dump()})}\n\n"
            yield "data: [DONE]\n\n"
        except HTTPException as e:
            yield f"data: {json.dumps({'error': _error_body(e)})}\n\n"

    async def _complete(self, model, pipes, uids) -> ChatCompletionResponse:
        texts, finish = [[] for _ in pipes], ["stop"] * len(pipes)
        usage = UsageInfo()
        async for i, msg in self._messages(pipes, uids):
            texts[i].append(msg["content"])
            if msg.get("finish_reason"):
                finish[i] = msg["finish_reason"]
                usage = _add_usage(usage, msg, first=i == 0)
        choices = [ChatCompletionResponseChoice(index=i, message={"role": "assistant", "content": "".join(t)},
                                                finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish))]
        return ChatCompletionResponse(model=model, choices=choices, usage=usage)


def _add_usage(usage: UsageInfo, msg: dict, first: bool) -> UsageInfo:
    """The prompt counts once, the completions of all n choices add up."""
    prompt = msg["prompt_tokens"] if first else 0
    completion = usage.completion_tokens + msg["completion_tokens"]
    prompt += usage.prompt_tokens
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _error_body(e: HTTPException) -> dict:
    if isinstance(e.detail, dict):
        return e.detail
    return {"message": str(e.detail), "type": "invalid_request_error" if e.status_code < 500 else "server_error",
            "param": None, "code": None}


def pickleable(e: HTTPException) -> HTTPException:
    return PickleableHTTPException.from_exception(e)  # it crosses from the worker to the API process


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": _error_body(exc)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset)
        at = first.get("loc", (None, "?"))[-1]
        message, where = f"malformed JSON body (at character {at}): {first.get('ctx', {}).get('error', '')}", ""
    else:
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"invalid request: {first.get('msg', 'malformed body')}" + (f" (at {where})" if where else "")
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": where or None,
                                   "code": None}}, status_code=400)
