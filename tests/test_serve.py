"""The LitServe OpenAI-compatible server, driven by the official `openai` client and raw HTTP: the chat
route, the API key, the error shape of every error, and how messages are merged."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_http import call, healthy, openai_error
from tiny_chat import free_port, make_artifact, start_server, stop_server

KEY = "test-key"
CONTEXT = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    artifact = make_artifact(folder, sequence_len=CONTEXT)
    port = free_port()
    proc = start_server(artifact, port, f"api_key={KEY}", "max_batch_size=8", "batch_timeout=0.02",
                        "limits.max_tokens=200", "limits.max_payload_bytes=20000", log=folder / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, text, **kwargs):
    kwargs = {"max_tokens": 16, "temperature": 0, **kwargs}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], **kwargs)


def streamed(client, text, **kwargs) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in ask(client, text, stream=True, **kwargs):
        for choice in chunk.choices:
            out[choice.index] = out.get(choice.index, "") + (choice.delta.content or "")
    return out


def post(url: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    return call(url, "/v1/chat/completions", body, key)


def test_completion_and_stream_agree_at_temperature_0(client):
    completion = ask(client, "What is a decorator?", max_tokens=24)
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 24 and completion.usage.prompt_tokens > 5
    assert streamed(client, "What is a decorator?", max_tokens=24) == {0: text}
    assert client.models.list().data[0].id == "nanochat-sft"


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(n=3, seed=11, temperature=1.0, max_tokens=12)
    first = [c.message.content for c in ask(client, "Tell me about classes", **kwargs).choices]
    again = [c.message.content for c in ask(client, "Tell me about classes", **kwargs).choices]
    assert first == again and len(set(first)) == 3  # each choice samples its own stream
    assert streamed(client, "Tell me about classes", **kwargs) == dict(enumerate(first))


def test_stop_string_cuts_the_reply(client):
    text = ask(client, "Explain the with statement", max_tokens=30).choices[0].message.content
    stop = text[8:11]
    choice = ask(client, "Explain the with statement", max_tokens=30, stop=[stop]).choices[0]
    assert choice.message.content == text[:text.index(stop)] and choice.finish_reason == "stop"


BAD_REQUESTS = {
    "malformed json": (b'{"messages": [', 400, "malformed JSON"),
    "unknown role": (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "role 'wizard'"),
    "empty messages": (b'{"messages": []}', 400, "messages is empty"),
    "no content": (b'{"messages": [{"role": "user"}]}', 400, "no content"),
    "ends with assistant": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                            400, "last message must be the user's"),
    "prompt too long": (json.dumps({"messages": [{"role": "user", "content": "lambda " * 400}]}).encode(),
                        400, "context"),
    "max_tokens past the limit": (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}',
                                  400, "max_tokens=5000"),
    "max_tokens past the context": (json.dumps({"messages": [{"role": "user", "content": "lambda " * 12}],
                                                "max_tokens": 200}).encode(), 400, "exceeds the model's context"),
    "temperature": (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}', 400, "temperature"),
    "payload too large": (json.dumps({"messages": [{"role": "user", "content": "a" * 30000}]}).encode(),
                          413, "too large"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_healthy(server, name):
    body, status, message = BAD_REQUESTS[name]
    code, answer = post(server, body)
    assert code == status and message in openai_error(answer)["message"], answer
    assert healthy(server)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_401(server, key):
    code, answer = post(server, b'{"messages": [{"role": "user", "content": "hi"}]}', key=key)
    assert code == 401 and "API key" in openai_error(answer)["message"]
    assert openai_error(answer)["code"] == "invalid_api_key"
    assert healthy(server)


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/docs"),
                                          ("GET", "/redoc"), ("GET", "/openapi.json"), ("GET", "/info"),
                                          ("GET", "/nothing/here"), ("DELETE", "/health")])
def test_without_the_key_every_route_but_health_and_the_page_is_401(server, method, path):
    code, answer = call(server, path, key=None, method=method)
    assert code == 401 and openai_error(answer)["code"] == "invalid_api_key"
    code, _ = call(server, path, key=KEY, method=method)
    assert code != 401  # the key opens it (to a 200, or to its own 4xx)
    with urllib.request.urlopen(server + "/", timeout=10) as page:
        assert page.status == 200 and healthy(server)  # open without a key


def test_docs_and_schema_are_served_with_the_key(server):
    code, schema = call(server, "/openapi.json", key=KEY, method="GET")
    assert code == 200 and "/v1/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]
    code, page = call(server, "/docs", key=KEY, method="GET")
    assert code == 200 and "swagger" in page.lower()


FRAMEWORK_ERRORS = {  # errors FastAPI and LitServe raise themselves, before our code runs
    "unknown route": ("GET", "/v1/nothing", None, 404, "Invalid URL (GET /v1/nothing)", None),
    "wrong method": ("GET", "/v1/chat/completions", None, 405, "GET is not allowed on /v1/chat/completions", None),
    "body not UTF-8": ("POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, "could not be read", None),
    "body not JSON": ("POST", "/v1/completions", b"prompt=hi", 400, "malformed JSON", None),
    "no body": ("POST", "/v1/chat/completions", b"", 400, "Field required", None),
    "field of the wrong type": ("POST", "/v1/chat/completions",
                                b'{"messages": [{"role": "user", "content": "hi"}], "n": "many"}', 400,
                                "valid integer", "n"),
    "a union's member": ("POST", "/v1/completions", b'{"prompt": "a", "stop": [1]}', 400, "valid string", "stop"),
    "nested field": ("POST", "/v1/chat/completions", b'{"messages": [{"content": "hi"}]}', 400, "Field required",
                     "messages[0].role"),
    "payload too large": ("POST", "/v1/completions", json.dumps({"prompt": "a" * 30000}).encode(), 413, "too large",
                          None),
}


@pytest.mark.parametrize("name", FRAMEWORK_ERRORS)
def test_the_frameworks_own_errors_have_the_openai_shape(server, name):
    method, path, body, status, message, param = FRAMEWORK_ERRORS[name]
    code, answer = call(server, path, body, KEY, method)
    error = openai_error(answer)
    assert code == status and message in error["message"] and error["param"] == param, answer
    assert error["type"] == "invalid_request_error" and healthy(server)


def test_openai_client_sees_the_error_messages(server, client):
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "lambda " * 400)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        ask(openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0), "hi")
    assert ask(client, "still there?").choices[0].message.content  # and the next request is served


def reply(client, messages, **kwargs):
    completion = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                **kwargs)
    return completion.choices[0].message.content, completion.usage.prompt_tokens


def test_consecutive_messages_of_one_side_are_merged_with_a_blank_line(client):
    """As OpenAI accepts them: system/developer messages are user text, consecutive ones are one turn."""
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    split = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Use Python."},
             user("What is"), user("a tuple?"), {"role": "assistant", "content": "A sequence."},
             {"role": "assistant", "content": "Immutable."}, user("And"), {"role": "system", "content": "a list?"}]
    merged = [user("Be brief.\n\nUse Python.\n\nWhat is\n\na tuple?"),
              {"role": "assistant", "content": "A sequence.\n\nImmutable."}, user("And\n\na list?")]
    assert reply(client, split) == reply(client, merged)
    assert reply(client, split) != reply(client, [user("What is a tuple?")])  # the merged text did matter
    with pytest.raises(openai.BadRequestError, match="starts with the assistant") as e:
        reply(client, [{"role": "assistant", "content": "Hi"}, user("hello")])
    assert e.value.param == "messages[0].role"


def test_a_client_that_leaves_mid_stream_does_not_disturb_the_server(server, client):
    body = json.dumps({"messages": [{"role": "user", "content": "go on and on"}], "max_tokens": 200,
                       "temperature": 1.0, "stream": True}).encode()
    request = urllib.request.Request(server + "/v1/chat/completions", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.readline().startswith(b"data: ")  # the stream started; now hang up
    assert healthy(server) and ask(client, "and you?").choices[0].message.content


def test_32_concurrent_requests_all_complete_and_match_their_solo_answers(client):
    prompts = [f"Question number {i}: what is {i} + {i}?" for i in range(32)]
    solo = {p: ask(client, p, max_tokens=12).choices[0].message.content for p in prompts[:4]}

    def one(i):
        p = prompts[i]
        return streamed(client, p, max_tokens=12)[0] if i % 2 else ask(client, p, max_tokens=12).choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(one, range(32)))
    assert len(answers) == 32 and all(answers)
    # greedy answers don't depend on which other requests shared the batch
    assert {p: a for p, a in zip(prompts, answers) if p in solo} == solo
