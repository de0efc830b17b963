"""No 5xx for any client input: hostile requests get a 4xx naming the field (or are handled), and none
of them disturbs the requests decoding beside it. Raw HTTP sends what the `openai` client refuses to
(lone surrogates, NaN: it will not encode them), the client sends everything else."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from queue import Empty
from types import SimpleNamespace

import openai
import pytest

from llm.artifact import load_artifact
from llm.generate.engine import Generator
from llm.generate.sampling import Sampling
from llm.serving.batching import ContinuousBatching
from serve_http import call, healthy, openai_error, stream_lines
from tiny_chat import PoisonedRow, free_port, make_artifact, start_server, stop_server

KEY = "hostile-key"
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def chat(**fields) -> dict:
    return {**HI, **fields}


# name: (path, body, expected status, the field a 4xx names)
HOSTILE = {
    # text that is not valid Unicode: JSON's \ud800 escape is a lone surrogate once parsed
    "surrogate in a message": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800"}]}',
                               400, "messages[0].content"),
    "surrogate in a content part": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": '
                                    '[{"type": "text", "text": "\\udfff"}]}]}', 400, "messages[0].content[0].text"),
    "surrogate in stop": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], '
                          '"stop": ["x", "\\ud800"]}', 400, "stop[1]"),
    "surrogate in model": ("/v1/chat/completions", '{"model": "m\\ud800", "messages": [{"role": "user", '
                           '"content": "a"}]}', 400, "model"),
    "surrogate in a metadata key": ("/v1/chat/completions", '{"metadata": {"\\ud800": "v"}, "messages": '
                                    '[{"role": "user", "content": "a"}]}', 400, "metadata.\\ud800"),
    "surrogate in a completion prompt": ("/v1/completions", '{"prompt": ["ok", "\\ud800"]}', 400, "prompt[1]"),
    # numbers JSON can carry but no sampler should take
    "temperature NaN": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], '
                        '"temperature": NaN}', 400, "temperature"),
    "temperature Infinity": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], '
                             '"temperature": Infinity}', 400, "temperature"),
    "temperature 1e400 (inf once parsed)": ("/v1/completions", '{"prompt": "a", "temperature": 1e400}', 400,
                                            "temperature"),
    "top_p NaN": ("/v1/completions", '{"prompt": "a", "top_p": NaN}', 400, "top_p"),
    "top_p -Infinity": ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a"}], '
                        '"top_p": -Infinity}', 400, "top_p"),
    # bodies built to exhaust a parser
    "a prompt nested 900 lists deep": ("/v1/completions", '{"prompt": ' + "[" * 900 + "]" * 900 + "}", 400, "prompt"),
    "nesting past the JSON parser's depth": ("/v1/chat/completions", '{"messages": ' + "[" * 5000 + "]" * 5000 + "}",
                                             400, None),
    "an integer of 5000 digits": ("/v1/completions", '{"prompt": "a", "max_tokens": ' + "9" * 5000 + "}", 400, None),
}
# cases the openai client can send too: (path, body fields, expected status, field)
NUMERIC = {
    "temperature 5e-324": (chat(temperature=5e-324), 200, None),
    "temperature 1e-300": (chat(temperature=1e-300), 200, None),
    "temperature 1e-40": (chat(temperature=1e-40), 200, None),
    "temperature 1e-8": (chat(temperature=1e-8, seed=1), 200, None),
    "temperature 1e300": (chat(temperature=1e300), 400, "temperature"),
    "temperature -0.5": (chat(temperature=-0.5), 400, "temperature"),
    "top_p 1e-300": (chat(top_p=1e-300, temperature=1.0), 200, None),
    "top_p 0": (chat(top_p=0), 400, "top_p"),
    "top_p 1.5": (chat(top_p=1.5), 400, "top_p"),
    "top_k 10**30": (chat(top_k=10 ** 30, temperature=1.0), 200, None),
    "top_k 0": (chat(top_k=0), 400, "top_k"),
    "seed 2**63 - 1 with n=2": (chat(seed=2 ** 63 - 1, n=2, temperature=1.0), 200, None),
    "seed -2**63": (chat(seed=-2 ** 63, temperature=1.0), 200, None),
    "seed 2**64": (chat(seed=2 ** 64), 400, "seed"),
    "seed -2**70": (chat(seed=-2 ** 70), 400, "seed"),
    "n 0": (chat(n=0), 400, "n"),
    "n 10**20": (chat(n=10 ** 20), 400, "n"),
    "max_tokens 0": (chat(max_tokens=0), 400, "max_tokens"),
    "max_tokens -1": (chat(max_tokens=-1), 400, "max_tokens"),
    "max_tokens 10**20": (chat(max_tokens=10 ** 20), 400, "max_tokens"),
    "max_completion_tokens 0": ({"messages": HI["messages"], "max_completion_tokens": 0}, 400,
                                "max_completion_tokens"),
    "max_completion_tokens -7": ({"messages": HI["messages"], "max_completion_tokens": -7}, 400,
                                 "max_completion_tokens"),
    # fields the response would echo (model) or a log would keep
    "model of 10k characters": (chat(model="m" * 10_000), 400, "model"),
    "user of 10k characters": (chat(user="u" * 10_000), 400, "user"),
    "metadata with 17 pairs": (chat(metadata={f"k{i}": "v" for i in range(17)}), 400, "metadata"),
    "metadata value of 600 characters": (chat(metadata={"k": "v" * 600}), 400, "metadata"),
}
COMPLETIONS = {  # the same classes on /v1/completions
    "temperature 1e-300": ({"prompt": "a", "max_tokens": 4, "temperature": 1e-300}, 200, None),
    "max_tokens -1": ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    "max_tokens 0 without echo": ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    "n 0": ({"prompt": "a", "n": 0}, 400, "n"),
    "seed 2**64": ({"prompt": "a", "seed": 2 ** 64}, 400, "seed"),
    "model of 10k characters": ({"prompt": "a", "model": "m" * 10_000}, 400, "model"),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    port = free_port()
    proc = start_server(make_artifact(folder), port, f"api_key={KEY}", "max_batch_size=8", "limits.max_tokens=200",
                        log=folder / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def check(code: int, answer, status: int, param: str | None) -> None:
    if status == 200:
        assert code == 200 and answer["choices"], answer
    else:
        error = openai_error(answer)
        assert code == status and error["param"] == param, answer


@pytest.mark.parametrize("name", HOSTILE)
def test_text_and_numbers_only_raw_http_can_send_get_a_400_naming_the_field(server, name):
    path, body, status, param = HOSTILE[name]
    code, answer = call(server, path, body.encode(), KEY)
    check(code, answer, status, param)
    assert healthy(server)


@pytest.mark.parametrize("name", list(NUMERIC) + [f"completions: {n}" for n in COMPLETIONS])
def test_numeric_edges_and_oversized_fields_over_raw_http(server, name):
    path, cases = ("/v1/completions", COMPLETIONS) if name.startswith("completions: ") else \
        ("/v1/chat/completions", NUMERIC)
    body, status, param = cases[name.removeprefix("completions: ")]
    code, answer = call(server, path, body, KEY)
    check(code, answer, status, param)
    assert healthy(server)


def through_the_client(client, path: str, body: dict):
    """The request sent by the openai client (top_k, ours, as an extra field)."""
    body = dict(body)
    extra = {"top_k": body.pop("top_k")} if "top_k" in body else None
    if path == "/v1/completions":
        return client.completions.create(model=body.pop("model", "tiny"), **body, extra_body=extra)
    return client.chat.completions.create(model=body.pop("model", "tiny"), **body, extra_body=extra)


@pytest.mark.parametrize("name", list(NUMERIC) + [f"completions: {n}" for n in COMPLETIONS])
def test_numeric_edges_and_oversized_fields_through_the_openai_client(server, client, name):
    path, cases = ("/v1/completions", COMPLETIONS) if name.startswith("completions: ") else \
        ("/v1/chat/completions", NUMERIC)
    body, status, param = cases[name.removeprefix("completions: ")]
    if status == 200:
        assert through_the_client(client, path, body).choices
    else:
        with pytest.raises(openai.BadRequestError) as e:
            through_the_client(client, path, body)
        assert e.value.status_code == status and e.value.param == param
    assert healthy(server)


def test_the_client_refuses_to_send_what_raw_http_covers(client):
    """Why the cases above go over raw HTTP: the client cannot even encode them."""
    with pytest.raises(UnicodeEncodeError):
        through_the_client(client, "/v1/chat/completions", chat(messages=[{"role": "user", "content": "\ud800"}]))
    with pytest.raises(ValueError, match="JSON compliant"):
        through_the_client(client, "/v1/chat/completions", chat(temperature=float("nan")))


def test_requests_that_once_broke_the_batch_do_not_disturb_the_answers_in_flight(server, client):
    """A tiny temperature used to turn every answer in its batch into a 500 (nan logits, then an
    IndexError in the shared step). Three long greedy streams decode; while they do, hostile requests
    arrive — accepted ones join their batch, refused ones never reach it — and the streams still give
    exactly their solo answers."""
    prompts = [f"Tell me about topic {i}" for i in range(3)]
    body = {"max_tokens": 180, "temperature": 0}
    solo = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], **body)
            .choices[0].message.content for p in prompts]
    started, first_bad = threading.Barrier(len(prompts) + 1, timeout=120), threading.Event()
    overlapped = []

    def good(prompt: str) -> str:
        text, waited = "", False
        for event in stream_lines(server, {"messages": [{"role": "user", "content": prompt}], **body}, KEY):
            if event != "[DONE]":
                text += event["choices"][0]["delta"].get("content") or ""
            if not waited:
                started.wait()
                waited = True
        overlapped.append(first_bad.is_set())  # a hostile one was answered before this stream ended
        return text

    def hostile(fields: dict):
        code, answer = call(server, "/v1/chat/completions", {**HI, "max_tokens": 8, **fields}, KEY)
        first_bad.set()
        return code

    accepted = [{"temperature": t} for t in (1e-300, 5e-324, 1e-40, 1e-8)] + [{"top_p": 1e-300, "temperature": 1}]
    refused = [{"temperature": 1e300}, {"max_completion_tokens": 0}, {"seed": 2 ** 64}, {"n": 0}]
    with ThreadPoolExecutor(len(prompts) + len(accepted) + len(refused)) as pool:
        streams = [pool.submit(good, p) for p in prompts]
        started.wait()  # every stream has its first chunk: all three are decoding
        codes = list(pool.map(hostile, accepted + refused))
        answers = [s.result() for s in streams]
    assert codes == [200] * len(accepted) + [400] * len(refused)
    assert answers == solo
    assert all(overlapped), "the hostile requests should have arrived while the streams decoded"
    assert healthy(server)


class FakeQueue:
    """The worker's request queue: the jobs, then LitServe's shutdown sentinel once `done()`."""

    def __init__(self, jobs, done):
        self.items, self.done = deque(jobs), done

    def get(self, timeout=None):
        return self.get_nowait()

    def get_nowait(self):
        if self.items:
            return self.items.popleft()
        if self.done():
            return (None, None, None, None)
        raise Empty


class FakeTransport:
    def __init__(self):
        self.sent: dict = {}

    def send(self, item, consumer_id):
        uid, (data, status, _, _) = item
        self.sent.setdefault(uid, []).append((data, status))

    def ended(self) -> int:
        return sum(status in ("FINISH_STREAMING", "ERROR") for replies in self.sent.values() for _, status in replies)


@pytest.mark.usefixtures("one_torch_thread")
def test_a_request_that_fails_in_the_worker_fails_alone(tmp_path):
    """The server's loop, driven with LitServe's queue and transport replaced: of three requests in one
    batch, the one whose row fails (nan logits) is answered 500, the other two finish as if alone."""
    model, tokenizer, _ = load_artifact(make_artifact(tmp_path))
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hello"}]})
    settings = [Sampling(10, temperature=0), Sampling(10, temperature=0.9), Sampling(10, temperature=0)]
    jobs = [(0, f"uid{i}", time.monotonic(), {"prompt": prompt, "sampling": s, "seed": i})
            for i, s in enumerate(settings)]
    transport = FakeTransport()
    loop = ContinuousBatching()
    loop._requests, loop._transport = FakeQueue(jobs, lambda: transport.ended() == 3), transport
    api = SimpleNamespace(generator=Generator(PoisonedRow(model, 1, width=3), tokenizer), batch_timeout=0.01,
                          request_timeout=60, max_batch_size=8)
    loop.run(api)
    error, status = transport.sent["uid1"][-1]
    assert status == "ERROR" and error.status_code == 500 and "FloatingPointError" in error.detail["message"]
    alone = Generator(model, tokenizer).complete(prompt, max_tokens=10, temperature=0)
    for uid in ("uid0", "uid2"):
        replies = transport.sent[uid]
        assert [s for _, s in replies][-2:] == ["OK", "FINISH_STREAMING"]
        final = json.loads(replies[-2][0])
        assert final["finish_reason"] == "length" and final["completion_tokens"] == 10
        text = "".join(json.loads(data)["content"] for data, s in replies if s == "OK")
        assert text == alone


def test_after_all_of_it_the_server_is_healthy_and_answers(server, client):
    assert healthy(server)
    answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "still there?"}],
                                            max_tokens=6, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
