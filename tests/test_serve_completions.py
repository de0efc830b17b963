"""POST /v1/completions: OpenAI's legacy protocol as lm-eval's local-completions backend uses it.

The server runs in fp32 (precision=fp32) and the test loads the same artifact in fp32, so the logprobs
it reports can be compared with our model's own log_softmax: what differs is only the float32 rounding
of different matmul shapes (~1e-6), far under the 1e-4 tolerance, on any CPU.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch

from llm.artifact import load_artifact
from serve_http import call, healthy, openai_error, stream_lines
from tiny_chat import free_port, make_artifact, start_server, stop_server

KEY = "completions-key"
CONTEXT = 256
TEXT = "The with statement wraps a block: enter, run, exit."
TOL = 1e-4


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("completions"), sequence_len=CONTEXT)


@pytest.fixture(scope="module")
def server(artifact):
    port = free_port()
    proc = start_server(artifact, port, f"api_key={KEY}", "precision=fp32", "max_batch_size=8",
                        "limits.max_prompts=4", "limits.max_logprobs=5", log=artifact.parent / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ours(artifact):
    model, tokenizer, _ = load_artifact(artifact)
    return model.eval(), tokenizer


def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, vocab): log P(next token | ids[:i+1]) from a plain GPT forward, in float64."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, :-1].double().log_softmax(dim=-1)


def name(tokenizer, t: int) -> str:
    piece = tokenizer.decode_bytes([t])
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


def test_echo_with_max_tokens_0_returns_the_models_own_token_logprobs(client, ours):
    model, tokenizer = ours
    choice = client.completions.create(model="tiny", prompt=TEXT, max_tokens=0, echo=True, logprobs=5).choices[0]
    ids = tokenizer.encode(TEXT, prepend_bos=True)  # a text prompt is scored after <|bos|>
    expected = log_softmax(model, ids)
    lp = choice.logprobs
    assert choice.text == TEXT and choice.finish_reason == "length"
    assert lp.tokens == [name(tokenizer, t) for t in ids] and lp.tokens[0] == "<|bos|>"
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i, t in enumerate(ids[1:]):
        assert abs(lp.token_logprobs[i + 1] - expected[i, t].item()) < TOL
        best = expected[i].topk(5).indices.tolist()
        top = lp.top_logprobs[i + 1]
        assert set(top) == {name(tokenizer, b) for b in best + [t]}  # the 5 best, and the token itself
        assert all(abs(top[name(tokenizer, b)] - expected[i, b].item()) < TOL for b in best)
    # text_offset: where each token's text starts in the echoed text (<|bos|> shows nothing)
    pieces = [tokenizer.decode(ids[1:i]) for i in range(1, len(ids) + 1)]
    assert lp.text_offset == [0] + [len(p) for p in pieces[:-1]]


def test_token_prompts_are_scored_as_given_and_batches_keep_their_order(client, ours):
    model, tokenizer = ours
    prompts = [tokenizer.encode("def f(x):"), tokenizer.encode(TEXT, prepend_bos=True)]
    answer = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [c.index for c in answer.choices] == [0, 1]
    for ids, choice in zip(prompts, answer.choices):
        expected = log_softmax(model, ids)
        got = choice.logprobs.token_logprobs
        assert len(got) == len(ids) and got[0] is None  # no <|bos|> added to ids
        assert max(abs(g - expected[i, t].item()) for i, (g, t) in enumerate(zip(got[1:], ids[1:]))) < TOL
    assert answer.usage.prompt_tokens == sum(map(len, prompts)) and answer.usage.completion_tokens == 0


def test_an_lm_eval_loglikelihood_request_reads_the_continuations_logprob(server, ours):
    """The body lm-eval's LocalCompletionsAPI._create_payload sends for loglikelihood, parsed as its
    parse_logprobs does: sum(token_logprobs[ctxlen:-1]) (the last entry is the one generated token),
    greedy when each token's logprob is the best of its top_logprobs."""
    model, tokenizer = ours
    pairs = [("The with statement", " wraps a block"), ("Lambda expressions", " are small")]
    requests = [(tokenizer.encode(c, prepend_bos=True), tokenizer.encode(x)) for c, x in pairs]
    body = {"model": "tiny", "prompt": [c + x for c, x in requests], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    code, answer = call(server, "/v1/completions", body, KEY)
    assert code == 200
    for choice, (context, continuation) in zip(sorted(answer["choices"], key=lambda c: c["index"]), requests):
        logprobs = choice["logprobs"]
        ctxlen = len(context)
        got = sum(logprobs["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in zip(logprobs["token_logprobs"][ctxlen:-1],
                                                                  logprobs["top_logprobs"][ctxlen:-1]))
        full = context + continuation
        expected = log_softmax(model, full)
        positions = range(ctxlen - 1, len(full) - 1)
        assert abs(got - sum(expected[i, full[i + 1]].item() for i in positions)) < TOL
        assert is_greedy == all(expected[i].argmax().item() == full[i + 1] for i in positions)
        assert len(logprobs["token_logprobs"]) == len(full) + 1  # the generated token ends the list


def test_stream_and_plain_completions_are_equal_at_temperature_0(server, client):
    kwargs = dict(prompt=["def area(r):", "Lambda"], max_tokens=12, temperature=0, n=2, logprobs=2, echo=True)
    plain = client.completions.create(model="tiny", **kwargs)
    texts, tokens, logprobs, finish = {}, {}, {}, {}
    for chunk in client.completions.create(model="tiny", stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.logprobs:
                tokens.setdefault(c.index, []).extend(c.logprobs.tokens)
                logprobs.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert len(plain.choices) == 4 and sorted(texts) == [0, 1, 2, 3]
    for c in plain.choices:
        assert texts[c.index] == c.text and c.text.startswith(kwargs["prompt"][c.index // 2])
        assert tokens[c.index] == c.logprobs.tokens and logprobs[c.index] == c.logprobs.token_logprobs
        assert finish[c.index] == c.finish_reason == "length"
    assert plain.choices[0].text == plain.choices[1].text  # n greedy choices agree
    assert plain.usage.completion_tokens == 4 * 12


def test_generated_tokens_logprobs_are_the_models(client, ours):
    model, tokenizer = ours
    choice = client.completions.create(model="tiny", prompt=TEXT, max_tokens=10, temperature=0, logprobs=3).choices[0]
    ids = tokenizer.encode(TEXT, prepend_bos=True)
    for _ in range(10):  # greedy without a cache: what the server's cached decode must have produced
        ids.append(log_softmax(model, ids + [0])[-1].argmax().item())
    generated, expected = ids[-10:], log_softmax(model, ids)[-10:]
    assert choice.logprobs.tokens == [name(tokenizer, t) for t in generated]
    for i, t in enumerate(generated):
        assert abs(choice.logprobs.token_logprobs[i] - expected[i, t].item()) < TOL
        top = choice.logprobs.top_logprobs[i]
        assert len(top) == 3 and max(top.values()) == choice.logprobs.token_logprobs[i]  # greedy: the best
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)


def test_sampled_tokens_report_the_models_logprobs_not_the_tempered_ones(client, ours):
    """At temperature 0.5 the sampler draws from softmax(logits / 0.5); logprobs still describe the model."""
    model, tokenizer = ours
    names = [name(tokenizer, t) for t in range(tokenizer.vocab_size)]
    choice = client.completions.create(model="tiny", prompt=TEXT, max_tokens=8, temperature=0.5, seed=3,
                                       logprobs=0).choices[0]
    ids = tokenizer.encode(TEXT, prepend_bos=True)
    for token, logprob in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs):
        model_logprobs = log_softmax(model, ids + [0])[-1]
        matches = [t for t in range(len(names)) if names[t] == token and abs(model_logprobs[t] - logprob) < TOL]
        assert matches, f"{token!r} with logprob {logprob} is no token of the model's distribution"
        ids.append(matches[0])
    assert len(ids) == len(tokenizer.encode(TEXT, prepend_bos=True)) + 8


def test_a_text_prompt_gets_bos_unless_add_special_tokens_is_false(client):
    plain = client.completions.create(model="tiny", prompt="x = 1", max_tokens=0, echo=True, logprobs=0)
    bare = client.completions.create(model="tiny", prompt="x = 1", max_tokens=0, echo=True, logprobs=0,
                                     extra_body={"add_special_tokens": False})
    assert plain.choices[0].logprobs.tokens == ["<|bos|>", *bare.choices[0].logprobs.tokens]
    assert bare.choices[0].logprobs.token_logprobs[0] is None


BAD = {  # body fields -> the field the 400 names
    "logprobs -1": ({"prompt": "a", "logprobs": -1}, "logprobs"),
    "logprobs past the limit": ({"prompt": "a", "logprobs": 6}, "logprobs"),
    "logprobs not a number": ({"prompt": "a", "logprobs": "many"}, "logprobs"),
    "logprobs 1.5": ({"prompt": "a", "logprobs": 1.5}, "logprobs"),
    "prompt missing": ({"max_tokens": 3}, "prompt"),
    "prompt null": ({"prompt": None}, "prompt"),
    "prompt empty list": ({"prompt": []}, "prompt"),
    "prompt a number": ({"prompt": 7}, "prompt"),
    "prompt of floats": ({"prompt": [1.5, 2]}, "prompt"),
    "prompt mixing strings and ids": ({"prompt": ["a", 3]}, "prompt"),
    "prompt an empty token list": ({"prompt": [[]]}, "prompt[0]"),
    "prompt ids outside the vocabulary": ({"prompt": [[1, 2], [5, 10 ** 9]]}, "prompt[1]"),
    "prompt a dict": ({"prompt": {"text": "a"}}, "prompt"),
    "too many prompts": ({"prompt": ["a"] * 5}, "prompt"),
    "prompt longer than the context": ({"prompt": "lambda " * 300, "echo": True, "max_tokens": 0}, "prompt"),
    "prompt + max_tokens past the context": ({"prompt": [1] * 250, "max_tokens": 10}, "max_tokens"),
    "empty text without bos": ({"prompt": "", "add_special_tokens": False}, "prompt"),
    "suffix": ({"prompt": "a", "suffix": "b"}, "suffix"),
    "best_of": ({"prompt": "a", "best_of": 3}, "best_of"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_logprobs_and_prompt_values_get_a_400_naming_the_field(server, client, case):
    fields, param = BAD[case]
    code, answer = call(server, "/v1/completions", fields, KEY)
    error = openai_error(answer)
    assert code == 400 and error["param"] == param, answer
    known = {k: fields[k] for k in ("prompt", "logprobs", "echo", "max_tokens", "suffix", "best_of") if k in fields}
    extra = {k: v for k, v in fields.items() if k not in known}
    if "prompt" in known:  # the openai client requires a prompt (and can send any JSON value in it)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", **known, extra_body=extra or None)
        assert e.value.param == param
    assert healthy(server)


def test_streaming_sends_the_echo_first_and_usage_last(server):
    events = list(stream_lines(server, {"prompt": "Lambda", "max_tokens": 5, "temperature": 0, "echo": True,
                                        "stream_options": {"include_usage": True}}, KEY, "/v1/completions"))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    assert events[0]["choices"][0]["text"].startswith("Lambda") and events[0]["object"] == "text_completion"
    assert json.dumps(events)  # every event parsed as JSON
