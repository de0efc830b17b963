"""OpenAI's chat-completions protocol (POST /v1/chat/completions): request -> jobs, replies -> response.

A request is checked completely here, in the API process (llm/serving/validation.py for the fields
both routes share), and answered 400 naming the field before anything reaches the model. A good one
becomes one job per choice (prompt ids, Sampling, seed + choice index); the worker's replies come back
as (choice, message) pairs and become OpenAI chunks (stream=true) or one completion, each choice with
its own finish_reason.

Messages are taken as OpenAI takes them. Our chat format has user and assistant turns only, so:
system and developer messages count as user text (a leading system message is what the tokenizer
already folds into the first user turn), and consecutive messages on the same side are merged into one
turn, their texts joined with a blank line ("\\n\\n") — the separator the tokenizer puts after a system
message. The merged conversation must start and end with a user turn (the model writes the next
assistant turn).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from pydantic import BaseModel

from llm.serving.errors import api_error, error_of
from llm.serving.validation import (Limits, check_echoed, check_n, check_seed, check_text, sampling,
                                    token_budget)
from llm.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant")
Replies = AsyncIterator[tuple[int, dict]]  # (choice index, worker message) as they arrive


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's request we act on (others are ignored), plus top_k (ours)."""
    model: str | None = None
    messages: list[ChatMessage]
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # takes precedence over max_tokens, as in OpenAI's API
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: dict | None = None  # {"include_usage": true} adds a final chunk with the usage
    user: str | None = None
    metadata: dict[str, str] | None = None
    tools: list | None = None


def message_text(i: int, content) -> str:
    """A message's text: a str, or OpenAI's list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        if all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
        raise api_error(400, f"messages[{i}]: only text content is supported", f"messages[{i}].content")
    raise api_error(400, f"messages[{i}] has no content", f"messages[{i}].content")


def conversation(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI's messages as our user/assistant turns (see the module docstring)."""
    if not messages:
        raise api_error(400, "messages is empty: send at least one user message", "messages")
    turns: list[dict] = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise api_error(400, f"messages[{i}] has role {m.role!r}; valid roles: {', '.join(ROLES)}",
                            f"messages[{i}].role")
        role, text = ("assistant" if m.role == "assistant" else "user"), message_text(i, m.content)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + text
        else:
            turns.append({"role": role, "content": text})
    if turns[0]["role"] != "user":
        raise api_error(400, "the conversation starts with the assistant: begin with a user (or system) message",
                        "messages[0].role")
    if turns[-1]["role"] != "user":
        raise api_error(400, "the last message must be the user's (the model writes the next assistant turn)",
                        "messages")
    return turns


def chat_jobs(request: ChatRequest, tokenizer: Tokenizer, context: int, limits: Limits,
              defaults: dict) -> tuple[int, list[dict]]:
    """Validate a request: (prompt tokens, one worker job per choice)."""
    check_text(request.model_dump())
    check_echoed(request.model, request.user, request.metadata, limits)
    if request.tools:
        raise api_error(400, "tools are not supported by this model (it has a built-in calculator)", "tools")
    try:
        prompt = tokenizer.render_for_completion({"messages": conversation(request.messages)})
    except ValueError as e:
        raise api_error(400, str(e), "messages") from None
    n = check_n(request.n, limits)
    if len(prompt) >= context:
        raise api_error(400, f"the prompt is {len(prompt)} tokens but the model's context is {context}: "
                             f"shorten the conversation", "messages", "context_length_exceeded")
    name = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
    budget = token_budget(getattr(request, name), name, len(prompt), context, limits)
    settings = sampling(request, budget, limits, defaults)
    seed = check_seed(request.seed)
    return len(prompt), [{"prompt": prompt, "sampling": settings, "seed": None if seed is None else seed + i}
                         for i in range(n)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_chat(model: str, n: int, prompt_tokens: int, replies: Replies, include_usage: bool):
    """OpenAI's server-sent events: a role chunk per choice, content deltas, a finish chunk per choice,
    the usage if asked for, [DONE]; an error after the 200 went out is an {"error": ...} event. Chunks
    are written with json.dumps (one per token, so the cost matters) in the shape of OpenAI's
    ChatCompletionChunk."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}

    def chunk(i, delta, finish=None):
        return f"data: {json.dumps({**head, 'choices': [{'index': i, 'delta': delta, 'finish_reason': finish}]})}\n\n"

    completion_tokens = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, msg in replies:
            if msg.get("finish_reason"):
                completion_tokens += msg["completion_tokens"]
                yield chunk(i, {"content": msg["content"]} if msg["content"] else {}, msg["finish_reason"])
            elif msg["content"]:
                yield chunk(i, {"content": msg["content"]})
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, completion_tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    except Exception as e:  # an HTTPException from the worker, or anything else: the client hears of it
        yield f"data: {json.dumps({'error': error_of(e)})}\n\n"


async def complete_chat(model: str, n: int, prompt_tokens: int, replies: Replies) -> dict:
    texts, finish = [[] for _ in range(n)], ["stop"] * n
    completion_tokens = 0
    async for i, msg in replies:
        texts[i].append(msg["content"])
        if msg.get("finish_reason"):
            finish[i] = msg["finish_reason"]
            completion_tokens += msg["completion_tokens"]
    choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "finish_reason": f}
               for i, (t, f) in enumerate(zip(texts, finish))]
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
