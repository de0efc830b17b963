"""The inference worker: GeneratorAPI loads the artifact, ContinuousBatching drives the Generator.

Requests join the running DecodeBatch between steps (waiting at most batch_timeout for company),
every step streams each row's new text, and a finished row answers at once while the others keep
going. A job is {"prompt", "sampling", "seed"} and, from /v1/completions, "logprobs" (alternatives per
token, or None) and "score" (the prompt's own logprobs first: echo + logprobs); "sampling" is None when
nothing is to be generated (max_tokens=0).

Failures stay with their request: a job the Generator refuses is answered 400, a row that fails in a
step (DecodeBatch marks it finish="error") is answered 500 while its batch goes on; only a failure of
the whole forward fails every row of the step. The worker's replies are JSON messages:
{"content", "logprobs"?} while a row runs, then one with "finish_reason" and the token counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path

import litserve as ls
import torch

from llm.artifact import load_artifact
from llm.generate.engine import Generator, Row
from llm.generate.prepare import for_inference
from llm.serving.errors import api_error
from llm.serving.litserve_adapter import SHUTDOWN, WorkerLoop
from llm.serving.routes import OpenAIRoutes

logger = logging.getLogger(__name__)


class GeneratorAPI(ls.LitAPI):
    """Loads the artifact in the inference worker; ContinuousBatching does the rest."""

    def __init__(self, folder: Path, routes: OpenAIRoutes, max_batch_size: int, batch_timeout: float, device: str,
                 precision: str, threads: int | None):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, spec=routes,
                         loop=ContinuousBatching())
        self.folder, self.device_name, self.precision, self.threads = folder, device, precision, threads

    def authorize(self) -> None:
        """Nothing to do: the API key is checked for every route by llm/serving/auth.py. Defining this keeps
        LitServe's own check (the LIT_SERVER_API_KEY environment variable, an X-API-Key header) out."""

    def setup(self, device) -> None:
        # The API process needs a core too: threads spinning in OpenMP barriers while it runs can
        # slow a decode step 10x or more, so by default the worker leaves one core free.
        torch.set_num_threads(self.threads or max(1, (os.cpu_count() or 2) - 1))
        model, tokenizer, _ = load_artifact(self.folder, device=self.device_name)
        self.generator = Generator(for_inference(model, self.precision), tokenizer)

    def predict(self, x):  # the loop drives the Generator directly; nothing calls this
        raise NotImplementedError("GeneratorAPI is driven by ContinuousBatching")


class ContinuousBatching(WorkerLoop):
    """The inference worker's loop: admit waiting requests between steps, step, stream each row."""

    def run(self, lit_api: GeneratorAPI) -> None:
        gen = lit_api.generator
        batch = gen.new_batch()
        waiting: deque = deque()  # (arrival, key, job)
        while True:
            idle = batch.live == 0 and not waiting
            if not self._pull(waiting, block=idle, batch_timeout=lit_api.batch_timeout):
                return  # shutdown
            self._cancel(batch, waiting)
            self._expire(waiting, lit_api.request_timeout)
            if waiting and self._should_admit(batch, waiting, lit_api):
                self._admit(gen, batch, waiting, lit_api.max_batch_size)
            if batch.live:
                try:
                    events = batch.step()
                except Exception as e:  # the forward itself failed: its rows fail, never the worker
                    logger.exception("decode step failed")
                    for r in batch.rows:
                        if r.finish is None:
                            self._fail_row(r.key, e)
                    batch = gen.new_batch()
                    continue
                for row, _, _ in events:
                    self._send(row)

    def _pull(self, waiting: deque, block: bool, batch_timeout: float) -> bool:
        """Move requests from the queue to `waiting`; when idle, block for one and gather more for
        batch_timeout seconds. False when the worker is to shut down."""
        deadline = None
        while True:
            if block and not waiting:
                item = self.next_job(timeout=1.0)
            elif deadline is not None and time.monotonic() < deadline:
                item = self.next_job(timeout=max(deadline - time.monotonic(), 1e-3))
            else:
                item = self.next_job()
            if item is SHUTDOWN:
                return False
            if item is None:
                if block and not waiting:
                    continue
                return True
            key, arrival, job = item
            waiting.append((arrival, key, job))
            if block and deadline is None:
                deadline = time.monotonic() + batch_timeout

    @staticmethod
    def _cancel(batch, waiting: deque) -> None:
        """Apply cancel notes (a client went away): drop the request if it waits, stop its row if it runs."""
        notes = {key for _, key, job in waiting if job.get("cancel")}
        if notes:
            kept = [w for w in waiting if w[1] not in notes]
            waiting.clear()
            waiting.extend(kept)
            for key in notes:
                if batch.cancel(key):
                    logger.info("request %s cancelled: its client went away", key[1])

    def _expire(self, waiting: deque, timeout) -> None:
        if timeout in (None, False, -1):
            return
        while waiting and time.monotonic() - waiting[0][0] > timeout:
            _, key, _ = waiting.popleft()
            self.fail(key, api_error(504, "request timed out waiting for the model"))

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
            _, key, job = waiting[0]
            try:
                row = self._start(gen, key, job)
            except ValueError as e:  # validated by the API process already; never take the loop down
                waiting.popleft()
                self.fail(key, api_error(400, str(e)))
                continue
            except Exception as e:
                logger.exception("scoring a prompt failed")
                waiting.popleft()
                self._fail_row(key, e)
                continue
            if row is None:  # nothing to generate: answered already
                waiting.popleft()
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
                self._fail_row(r.key, e)

    def _start(self, gen: Generator, key, job: dict) -> Row | None:
        """The job's row, after sending its prompt's logprobs when asked (once, even if the row then waits
        for room in the batch). None when there is nothing to generate: the job is answered already."""
        if job.get("score") and not job.get("scored"):
            scored = gen.score(job["prompt"], job["logprobs"])
            self.reply(key, json.dumps({"prompt_logprobs": [None if s is None else [s.logprob, s.top]
                                                            for s in scored]}))
            job["scored"] = True
        if job["sampling"] is None:
            self.reply(key, json.dumps({"content": "", "finish_reason": "length", "prompt_tokens": len(job["prompt"]),
                                        "completion_tokens": 0}))
            self.finish(key)
            return None
        return gen.new_row(key, job["prompt"], job["sampling"], job["seed"], job.get("logprobs"))

    def _send(self, row: Row) -> None:
        if row.finish == "error":
            logger.error("request %s failed: %s", row.key[1], row.error)
            self.fail(row.key, api_error(500, f"generation failed for this request ({row.error})"))
            return
        message = {"content": row.text.take()}
        if row.logprobs is not None:
            message["logprobs"] = [[lp.token, lp.logprob, offset, lp.top] for offset, lp in row.logprobs_out]
            row.logprobs_out.clear()
        if row.finish is None:
            if message["content"] or message.get("logprobs"):
                self.reply(row.key, json.dumps(message))
            return
        n = len(row.tokens)
        message.update(finish_reason=row.finish, prompt_tokens=len(row.prompt), completion_tokens=n)
        self.reply(row.key, json.dumps(message))
        self.finish(row.key)

    def _fail_row(self, key, error: Exception) -> None:
        self.fail(key, api_error(500, f"generation failed: {type(error).__name__}"))
