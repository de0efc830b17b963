"""The LitServe OpenAI-compatible server, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

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
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return response.status == 200 and response.read() == b"ok"


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
    assert code == status and message in answer["error"]["message"], answer
    assert healthy(server)


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_api_key_is_401(server, key):
    code, answer = post(server, b'{"messages": [{"role": "user", "content": "hi"}]}', key=key)
    assert code == 401 and "API key" in answer["error"]["message"]
    assert healthy(server)


def test_openai_client_sees_the_error_messages(server, client):
    with pytest.raises(openai.BadRequestError, match="context"):
        ask(client, "lambda " * 400)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        ask(openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0), "hi")
    assert ask(client, "still there?").choices[0].message.content  # and the next request is served


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
