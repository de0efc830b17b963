"""The one module that uses LitServe's internals; pyproject.toml pins litserve to the range tested with it.

LitServe runs the HTTP routes in an API process and the model in an inference worker process, joined by
a request queue and a response transport. Our routes and our loop use that plumbing through this file:

    QueueSpec     base of the routes' spec: submit(job) queues a job for the worker and returns the
                  stream of its replies; release(uid, cancel) forgets it (and tells the worker to stop).
    WorkerLoop    base of the inference loop: next_job() takes a request off the queue, reply / finish /
                  fail answer one; LitServe calls it once in the worker and run() takes over.
    replace_page  our page at "/" instead of LitServe's "litserve running" placeholder.

LitAPI and LitServer, LitServe's public API, are used where the server is built (llm/serve.py,
llm/serving/batching.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from queue import Empty
from typing import Any

import litserve as ls
from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException, ResponseBufferItem

SHUTDOWN = object()  # what next_job returns when LitServe stops the worker


class QueueSpec(ls.OpenAISpec):
    """A LitSpec whose routes talk to the worker through submit/release (OpenAISpec's base for
    `stream=True`, so LitServe adds no gzip that would hold back streamed chunks)."""

    def pre_setup(self, lit_api) -> None:
        """Subclasses register their routes with add_endpoint here. OpenAISpec's own route and its
        checks of LitAPI.predict don't apply: the loop drives the model, not predict()."""

    def submit(self, job: Any) -> tuple[uuid.UUID, AsyncIterator[Any]]:
        """Queue `job` for the worker: (its id, the async stream of the worker's replies). The stream
        ends when the worker finishes the job and raises the HTTPException the worker failed it with."""
        uid = uuid.uuid4()
        replies, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=replies, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), job))
        return uid, self._replies(replies, event)

    async def _replies(self, replies: deque, event: asyncio.Event) -> AsyncIterator[Any]:
        async for data, status in self.data_streamer(replies, event, send_status=True):
            if status == LitAPIStatus.ERROR:
                raise data if isinstance(data, HTTPException) else HTTPException(500, "generation failed")
            yield data

    def release(self, uid: uuid.UUID, cancel: bool) -> None:
        """Forget a job's replies; cancel=True also tells the worker to stop it (its client left)."""
        self.response_buffer.pop(uid, None)
        if cancel:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), {"cancel": True}))


class WorkerLoop(LitLoop):
    """Base of the inference worker's loop: subclasses implement run(lit_api)."""

    def __call__(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner) -> None:
        self._requests, self._transport = request_queue, transport
        self.run(lit_api)

    def run(self, lit_api) -> None:
        raise NotImplementedError

    def next_job(self, timeout: float | None = None):
        """(key, arrival time, job) of the next request, None if none came within `timeout` seconds
        (None: don't wait), or SHUTDOWN. A key names the request in reply/finish/fail."""
        try:
            item = self._requests.get(timeout=timeout) if timeout else self._requests.get_nowait()
        except Empty:
            return None
        if item == _SENTINEL_VALUE:
            return SHUTDOWN
        response_queue_id, uid, arrival, job = item
        return (response_queue_id, uid), arrival, job

    def reply(self, key, data: str) -> None:
        self._put(key, data, LitAPIStatus.OK)

    def finish(self, key) -> None:
        self._put(key, "", LitAPIStatus.FINISH_STREAMING)

    def fail(self, key, error: HTTPException) -> None:
        self._put(key, PickleableHTTPException.from_exception(error), LitAPIStatus.ERROR)

    def _put(self, key, data, status) -> None:
        response_queue_id, uid = key
        self.put_response(self._transport, response_queue_id, uid, data, status, LoopResponseType.STREAMING)


def replace_page(server: ls.LitServer, page: Callable) -> None:
    """Serve `page` at GET "/" in place of LitServe's placeholder route."""
    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
