"""The server's OpenAI routes, on LitServe's queue to the inference worker:

    POST /v1/chat/completions   llm/serving/openai_chat.py
    POST /v1/completions        llm/serving/openai_completions.py
    GET  /v1/models             the one model served

A route validates its request into jobs (one per choice) in the API process, submits them to the
worker (llm/serving/batching.py) and turns the replies into OpenAI's response. The replies of all
choices are merged as they arrive; when the client leaves, a choice fails, or the response is done,
the worker is told to stop the choices still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from llm.artifact import read_meta
from llm.serving.litserve_adapter import QueueSpec
from llm.serving.openai_chat import ChatRequest, chat_jobs, complete_chat, stream_chat
from llm.serving.openai_completions import (Choice, CompletionRequest, complete, completion_jobs,
                                            stream_completion, token_strings)
from llm.serving.validation import Limits
from llm.tokenizer import Tokenizer


class OpenAIRoutes(QueueSpec):
    def __init__(self, folder: Path, limits: Limits, defaults: dict, model_name: str):
        super().__init__()
        self.folder, self.limits, self.defaults, self.model_name = folder, limits, defaults, model_name

    def pre_setup(self, lit_api) -> None:
        for path, endpoint in (("/v1/chat/completions", self.chat_completion), ("/v1/completions", self.completion)):
            self.add_endpoint(path, endpoint, ["POST"])
            self.add_endpoint(path, self.preflight, ["OPTIONS"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def setup(self, server) -> None:
        super().setup(server)
        self.tokenizer = Tokenizer.load(self.folder)
        self.context = int(read_meta(self.folder)["model"]["sequence_len"])
        self.token_names = token_strings(self.tokenizer)

    async def preflight(self) -> Response:
        return Response(status_code=200)

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "nanochat-lightning"}]}

    async def chat_completion(self, request: ChatRequest):
        prompt_tokens, jobs = chat_jobs(request, self.tokenizer, self.context, self.limits, self.defaults)
        model, replies = request.model or self.model_name, self.replies(jobs)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_chat(model, len(jobs), prompt_tokens, replies, include_usage),
                                     media_type="text/event-stream")
        return JSONResponse(await complete_chat(model, len(jobs), prompt_tokens, replies))

    async def completion(self, request: CompletionRequest):
        prompts, jobs = completion_jobs(request, self.tokenizer, self.context, self.limits, self.defaults)
        n = len(jobs) // len(prompts)
        choices = [Choice(prompts[i // n], bool(request.echo), request.logprobs, self.token_names)
                   for i in range(len(jobs))]
        model, replies = request.model or self.model_name, self.replies(jobs)
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream_completion(model, choices, prompt_tokens, replies, include_usage),
                                     media_type="text/event-stream")
        return JSONResponse(await complete(model, choices, prompt_tokens, replies))

    async def replies(self, jobs: list[dict]) -> AsyncIterator[tuple[int, dict]]:
        """(choice index, worker message) from every job as they arrive; raises the first failure."""
        submitted = [self.submit(job) for job in jobs]
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            try:
                async for data in stream:
                    await merged.put((i, data))
                await merged.put((i, None))
            except Exception as e:
                await merged.put((i, e))

        tasks = [asyncio.create_task(pump(i, stream)) for i, (_, stream) in enumerate(submitted)]
        ended: set[int] = set()
        try:
            while len(ended) < len(jobs):
                i, item = await merged.get()
                if item is None or isinstance(item, Exception):
                    ended.add(i)
                    if item is not None:
                        raise item
                else:
                    yield i, json.loads(item)
        finally:
            for t in tasks:
                t.cancel()
            for i, (uid, _) in enumerate(submitted):
                self.release(uid, cancel=i not in ended)  # still running: its client is gone
