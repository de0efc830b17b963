"""Throughput and latency of `python -m llm.serve` under 1, 4 and 16 concurrent streaming clients.

    python bench/serve.py [--source FOLDER] [--depth 4] [--max-tokens 64] [--requests 4] [--clients 1 4 16]

Without --source it serves a d4 model (vocab 32768, sequence_len 1024, random weights) with a small
tokenizer, saved to a temp folder. Each client sends streaming chat requests back to back (closed loop,
--requests per client, plus one warm-up); we time each from sending to the last byte (latency) and to
the first content chunk (time to first token). Every request asks for exactly --max-tokens tokens
(temperature 1, random weights: a stop token is practically never sampled), so throughput is
comparable across concurrency levels.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import build  # noqa: E402  (the decode benchmark's model and tokenizer)
from tiny_chat import free_port, start_server, stop_server  # noqa: E402

from llm.artifact import save_artifact  # noqa: E402


def one_request(port: int, text: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streaming request."""
    body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                       "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return time.perf_counter() - start, first or 0.0, tokens


def run_level(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        one_request(port, f"warm-up {i}", max_tokens)
        ready.wait()  # everyone warmed up: the clock starts
        for j in range(requests):
            r = one_request(port, f"client {i} asks question {j}: what is {i} + {j}?", max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"clients": clients, "requests": len(results), "rps": len(results) / wall,
            "tokens_per_s": sum(r[2] for r in results) / wall,
            "p50": statistics.median(latencies), "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "ttft_p50": statistics.median(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=None, help="an artifact folder (default: a random d4)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="measured requests per client")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the server decodes: cpu or cuda")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the inference worker (default: the server's, cores - 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            model, tokenizer = build(args.depth)
            source = save_artifact(Path(tmp) / "bench", model.state_dict(), model.config, tokenizer, "sft", {})
        port = free_port()
        overrides = [f"max_batch_size={args.max_batch_size}", f"device={args.device}"]
        overrides += [f"threads={args.threads}"] if args.threads else []
        server = start_server(Path(source), port, *overrides, log=Path(tmp) / "log", threads=None)
        try:
            print(f"{source}: {args.max_tokens} tokens per request, max_batch_size={args.max_batch_size}, "
                  f"worker threads: {args.threads or 'server default'}")
            base = None
            for clients in args.clients:
                r = run_level(port, clients, args.requests, args.max_tokens)
                base = base or r["rps"]
                print(f"  {clients:2d} clients: {r['rps']:6.2f} req/s ({r['rps'] / base:4.1f}x), "
                      f"{r['tokens_per_s']:7.1f} tokens/s, latency p50 {r['p50']:.2f} s p95 {r['p95']:.2f} s, "
                      f"time to first token p50 {r['ttft_p50'] * 1e3:.0f} ms", flush=True)
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
