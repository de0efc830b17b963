"""python -m llm.serve source=sft port=8000: an OpenAI-compatible API and a chat page, on LitServe.

    POST /v1/chat/completions   OpenAI chat completions, streaming (SSE) or not: temperature, top_p,
                                max_tokens / max_completion_tokens, seed, stop, n (+ top_k, ours)
    POST /v1/completions        OpenAI's legacy completions: raw prompts (text or token ids, batched),
                                echo, logprobs with top alternatives (what lm-eval's local-completions sends)
    GET  /v1/models             the one model served          GET /health   200 "ok" once loaded
    GET  /                      the chat page (llm/serving/web/index.html)

Two processes do the work (LitServe's layout). The API process checks a request completely — API key,
fields, sizes, context, limits — and answers 4xx with an OpenAI-style JSON error before anything
reaches the model (llm/serving/routes.py and the protocol modules beside it). The inference worker runs
ContinuousBatching (llm/serving/batching.py): requests join the running DecodeBatch between steps
(waiting at most batch_timeout for company), every step streams each row's new text, a finished row
answers at once while the others keep going, and a row that fails fails alone. Every error, the
framework's 404/405/body errors included, has OpenAI's shape (llm/serving/errors.py). With api_key set,
all routes but /health and the page need it (llm/serving/auth.py says why).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import hydra
import litserve as ls
import torch
from fastapi.responses import HTMLResponse
from omegaconf import DictConfig

from llm.artifact import check_artifact, resolve_artifact
from llm.config import absolute
from llm.errors import one_line_errors
from llm.generate.prepare import PRECISIONS
from llm.serving import errors
from llm.serving.auth import ApiKeyGate
from llm.serving.batching import GeneratorAPI
from llm.serving.litserve_adapter import replace_page
from llm.serving.routes import OpenAIRoutes
from llm.serving.validation import Limits

PAGE = Path(__file__).parent / "serving" / "web" / "index.html"
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe can bind


def build_server(cfg: DictConfig) -> ls.LitServer:
    """The LitServer for cfg (see conf/serve.yaml); .run() it."""
    folder = resolve_artifact(cfg.source, absolute(cfg.paths.artifacts))
    meta = check_artifact(folder)  # here, not only in the worker: a damaged artifact fails the command at once
    limits = Limits(**cfg.limits)
    defaults = {"temperature": float(cfg.temperature), "top_k": cfg.top_k}
    name = cfg.model_name or f"nanochat-{meta['stage']}"
    api_key = None if cfg.api_key in (None, "") else str(cfg.api_key)
    device = cfg.device if cfg.device != "auto" else ("cuda" if _cuda() else "cpu")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r} is not one of {PRECISIONS}")
    api = GeneratorAPI(folder, OpenAIRoutes(folder, limits, defaults, name), int(cfg.max_batch_size),
                       float(cfg.batch_timeout), device, cfg.precision, cfg.threads)
    # fast_queue: answers travel over ZeroMQ rather than a multiprocessing.Manager queue, whose every
    # put is a round trip through the manager process (one per streamed token and row).
    server = ls.LitServer(api, accelerator="cpu" if device == "cpu" else "cuda", devices=1, workers_per_device=1,
                          timeout=float(cfg.timeout), max_payload_size=limits.max_payload_bytes,
                          fast_queue=bool(cfg.fast_queue),
                          middlewares=[(ApiKeyGate, {"key": api_key})] if api_key else [])
    page = PAGE.read_text()
    replace_page(server, lambda: HTMLResponse(page))
    errors.install(server.app)
    return server


def _cuda() -> bool:
    return torch.cuda.is_available()


def _stop_on_sigterm(main_pid: int):
    """SIGTERM handler: in the main process, shut down like Ctrl-C (LitServer then stops its workers);
    in a forked child that inherited it, die as SIGTERM normally does."""
    def handler(signum, frame):
        if os.getpid() == main_pid:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    return handler


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    if cfg.host not in HOSTS:
        raise ValueError(f"host={cfg.host!r}: LitServe binds one of {HOSTS} (127.0.0.1 = this machine only)")
    with one_line_errors():
        server = build_server(cfg)
    signal.signal(signal.SIGTERM, _stop_on_sigterm(os.getpid()))
    print(f"serving {cfg.source} at http://{cfg.host}:{cfg.port}/ (API: /v1/chat/completions, /v1/completions)",
          flush=True)
    server.run(host=cfg.host, port=int(cfg.port), generate_client_file=False, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
