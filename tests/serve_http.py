"""Raw HTTP to a running `python -m llm.serve` for the server tests (not a test module itself).

urllib only, so what goes over the wire is exactly the bytes a test writes: JSON's \\ud800 escapes, NaN,
bodies that are not UTF-8 — things the `openai` client refuses to send.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

ERROR_FIELDS = {"message", "type", "param", "code"}


def call(url: str, path: str = "/v1/chat/completions", body: bytes | dict | None = None, key: str | None = None,
         method: str | None = None) -> tuple[int, dict | str]:
    """(status, parsed JSON or text) of one request; a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def openai_error(answer) -> dict:
    """The {"error": {...}} of an answer, checked to have exactly OpenAI's four fields."""
    assert isinstance(answer, dict) and set(answer) == {"error"} and set(answer["error"]) == ERROR_FIELDS, answer
    return answer["error"]


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return response.status == 200 and response.read() == b"ok"


def stream_lines(url: str, body: dict, key: str | None, path: str = "/v1/chat/completions"):
    """The parsed `data:` events of a streaming request, as they arrive ("[DONE]" as the string)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data=json.dumps({**body, "stream": True}).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                yield payload.decode() if payload == b"[DONE]" else json.loads(payload)
