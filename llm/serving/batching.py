"""The inference worker: ChatAPI loads the artifact, ContinuousBatching drives the Generator.

Requests join the running DecodeBatch between steps (waiting at most batch_timeout for company),
every step streams each row's new text, and a finished row answers at once while the others keep
going. This and llm/serving/openai_chat.py are the only places that touch LitServe's internals.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from queue import Empty

import litserve as ls
import torch
from fastapi import Header, Request
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType

from llm.artifact import load_artifact
from llm.generate.engine import Generator
from llm.generate.prepare import for_inference
from llm.serving.openai_chat import ChatSpec, api_error, check_api_key, pickleable

logger = logging.getLogger(__name__)

class ChatAPI(ls.LitAPI):
    """Loads the artifact in the inference worker; ContinuousBatching does the rest."""

    def __init__(self, folder: Path, spec: ChatSpec, max_batch_size: int, batch_timeout: float, device: str,
                 precision: str = "auto", api_key: str | None = None, threads: int | None = None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=spec,
                         loop=ContinuousBatching())
        self.folder, self.device_name, self.precision, self.api_key = folder, device, precision, api_key
        self.threads = threads

    def authorize(self, request: Request, authorization: str | None = Header(None)) -> None:
        """LitServe runs this before every route (and before the body is validated): the API under
        /v1/ needs the key, the page and /health don't (a browser or a load balancer has none)."""
        if request.url.path.startswith("/v1/"):
            check_api_key(self.api_key, authorization)

    def setup(self, device) -> None:
        # The API process needs a core too: threads spinning in OpenMP barriers while it runs can
        # slow a decode step 10x or more, so by default the worker leaves one core free.
        torch.set_num_threads(self.threads or max(1, (os.cpu_count() or 2) - 1))
        model, tokenizer, _ = load_artifact(self.folder, device=self.device_name)
        self.generator = Generator(for_inference(model, self.precision), tokenizer)

    def predict(self, x):  # the loop drives the Generator directly; nothing calls this
        raise NotImplementedError("ChatAPI is driven by ContinuousBatching")


class ContinuousBatching(LitLoop):
    """The inference worker's loop: admit waiting requests between steps, step, stream each row."""

    def __call__(self, lit_api: ChatAPI, device, worker_id, request_queue, transport, workers_setup_status,
                 callback_runner) -> None:
        gen, self.transport = lit_api.generator, transport
        batch = gen.new_batch()
        waiting: deque = deque()  # (arrival, response_queue_id, uid, job)
        while True:
            idle = batch.live == 0 and not waiting
            if not self._pull(request_queue, waiting, block=idle, batch_timeout=lit_api.batch_timeout):
                return  # shutdown
            self._cancel(batch, waiting)
            self._expire(waiting, lit_api.request_timeout)
            if waiting and self._should_admit(batch, waiting, lit_api):
                self._admit(gen, batch, waiting, lit_api.max_batch_size)
            if batch.live:
                try:
                    events = batch.step()
                except Exception as e:  # a broken step fails its rows, never the worker
                    logger.exception("decode step failed")
                    for r in batch.rows:
                        if r.finish is None:
                            self._send_error(r.key, e)
                    batch = gen.new_batch()
                    continue
                for row, _, _ in events:
                    self._send(row)

    def _pull(self, request_queue, waiting: deque, block: bool, batch_timeout: float) -> bool:
        """Move requests from the queue to `waiting`; when idle, block for one and gather more for
        batch_timeout seconds. False when the shutdown sentinel arrives."""
        deadline = None
        while True:
            try:
                if block and not waiting:
                    item = request_queue.get(timeout=1.0)
                elif deadline is not None and time.monotonic() < deadline:
                    item = request_queue.get(timeout=max(deadline - time.monotonic(), 1e-3))
                else:
                    item = request_queue.get_nowait()
            except Empty:
                if block and not waiting:
                    continue
                return True
            if item == _SENTINEL_VALUE:
                return False
            response_queue_id, uid, timestamp, job = item
            waiting.append((timestamp, response_queue_id, uid, job))
            if block and deadline is None:
                deadline = time.monotonic() + batch_timeout

    @staticmethod
    def _cancel(batch, waiting: deque) -> None:
        """Apply cancel notes (a client went away): drop the request if it waits, stop its row if it runs."""
        notes = {(qid, uid) for _, qid, uid, job in waiting if job.get("cancel")}
        if notes:
            kept = [w for w in waiting if (w[1], w[2]) not in notes]
            waiting.clear()
            waiting.extend(kept)
            for key in notes:
                if batch.cancel(key):
                    logger.info("request %s cancelled: its client went away", key[1])

    def _expire(self, waiting: deque, timeout) -> None:
        if timeout in (None, False, -1):
            return
        while waiting and time.monotonic() - waiting[0][0] > timeout:
            _, qid, uid, _ = waiting.popleft()
            self._put(qid, uid, pickleable(api_error(504, "request timed out waiting for the model")),
                      LitAPIStatus.ERROR)

    @staticmethod
    def _should_admit(batch, waiting: deque, lit_api) -> bool:
        free = lit_api.max_batch_size - batch.live
        if free <= 0:
            return False
        # Joining costs a prefill and a cache rebuild: batch arrivals, but never wait past batch_timeout.
        return batch.live == 0 or len(waiting) >= free or time.monotonic() - waiting[0][0] >= lit_api.batch_timeout

    def _admit(self, gen: Generator, batch, waiting: deque, max_batch_size: int) -> None:
        rows = []
        while waiting and batch.live + len(rows) < max_batch_size:
            _, qid, uid, job = waiting[0]
            try:
                row = gen.new_row((qid, uid), job["prompt"], job["sampling"], job["seed"])
            except ValueError as e:  # validated by the API process already; never take the loop down
                waiting.popleft()
                self._put(qid, uid, pickleable(api_error(400, str(e))), LitAPIStatus.ERROR)
                continue
            if (rows or batch.live) and not batch.fits(rows + [row]):
                break  # the cache would outgrow the model's positions: wait for the batch to drain
            rows.append(row)
            waiting.popleft()
        if not rows:
            return
        try:
            batch.admit(rows)  # on failure the batch is left as it was
        except Exception as e:
            logger.exception("prefill failed")
            for r in rows:
                self._send_error(r.key, e)

    def _send(self, row) -> None:
        text = row.text.take()
        qid, uid = row.key
        if row.finish is None:
            if text:
                self._put(qid, uid, json.dumps({"role": "assistant", "content": text}), LitAPIStatus.OK)
            return
        n = len(row.tokens)
        final = {"role": "assistant", "content": text, "finish_reason": row.finish, "prompt_tokens": len(row.prompt),
                 "completion_tokens": n, "total_tokens": len(row.prompt) + n}
        self._put(qid, uid, json.dumps(final), LitAPIStatus.OK)
        self._put(qid, uid, "", LitAPIStatus.FINISH_STREAMING)

    def _send_error(self, key, error: Exception) -> None:
        qid, uid = key
        self._put(qid, uid, pickleable(api_error(500, f"generation failed: {type(error).__name__}")),
                  LitAPIStatus.ERROR)

    def _put(self, qid, uid, data, status) -> None:
        self.put_response(self.transport, qid, uid, data, status, LoopResponseType.STREAMING)
