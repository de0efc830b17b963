"""The Generator: cache correctness, batching, seeds, sampling cuts, stops and the calculator tool."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

import pytest
import torch

from llm.generate import engine
from llm.chat import ChatSession
from llm.artifact import load_artifact
from llm.generate.calculator import calculate
from llm.generate.engine import DecodeBatch, Generator
from llm.generate.sampler import BatchSampler
from llm.generate.sampling import GREEDY_BELOW, Sampling
from llm.generate.text_stream import TextStream
from llm.generate.prepare import for_inference
from llm.model.gpt import GPT, GPTConfig
from tiny_chat import REPO, PoisonedRow, make_artifact


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def gen(artifact):
    model, tokenizer, _ = load_artifact(artifact)
    return Generator(model, tokenizer)


@pytest.fixture(scope="module")
def tokenizer(gen):
    return gen.tokenizer


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["Hello", "The quick brown fox jumps over", "x", "Lambda expressions and the for statement"]
    return [tokenizer.encode(t, prepend_bos=True) for t in texts]


@torch.no_grad()
def greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def test_greedy_with_cache_equals_greedy_without(gen, prompts):
    for prompt in prompts[:2] + [[gen.tokenizer.bos_id]]:  # and a one-token prompt (nothing to prefill)
        (tokens, forced), = gen.generate_batch([prompt], max_tokens=16, temperature=0)
        assert tokens == greedy_without_cache(gen.model, prompt, 16)
        assert forced == [False] * 16


@pytest.mark.parametrize("prefill_chunks", [False, True])
def test_batch_of_prompts_equals_each_prompt_alone(gen, prompts, prefill_chunks, monkeypatch):
    if prefill_chunks:  # a logits budget so small that every prompt is prefilled on its own
        monkeypatch.setattr(engine, "PREFILL_LOGITS", gen.model.config.vocab_size)
    together = gen.generate_batch(prompts, num_samples=2, max_tokens=20, temperature=0)
    for i, prompt in enumerate(prompts):
        alone, = gen.generate_batch([prompt], max_tokens=20, temperature=0)
        assert together[2 * i] == alone and together[2 * i + 1] == alone


def test_rows_joining_a_running_batch_equal_each_prompt_alone(gen, prompts):
    """The server's path: rows are admitted while others run, and finished rows get compacted away."""
    sampling = [Sampling(max_tokens=n, temperature=0) for n in (6, 20, 9, 15)]
    rows = [gen.new_row(i, p, s) for i, (p, s) in enumerate(zip(prompts, sampling))]
    batch = DecodeBatch(gen.model, gen.tokenizer)
    batch.admit(rows[:2])
    for step in range(40):
        if step in (3, 7):  # a new row joins at steps 3 and 7
            batch.admit([rows[2 if step == 3 else 3]])
        if batch.live == 0:
            break
        batch.step()
    assert batch.rows == [] and batch.cache is None  # everything finished and was dropped
    for row, prompt, s in zip(rows, prompts, sampling):
        (alone, _), = gen.generate_batch([prompt], max_tokens=s.max_tokens, temperature=0)
        assert row.tokens == alone and row.finish == "length"


def test_a_cancelled_row_stops_and_the_others_carry_on(gen, prompts):
    rows = [gen.new_row(i, p, Sampling(max_tokens=10, temperature=0)) for i, p in enumerate(prompts[:2])]
    batch = DecodeBatch(gen.model, gen.tokenizer)
    batch.admit(rows)
    batch.step()
    assert batch.cancel(0) and not batch.cancel(0) and not batch.cancel("nobody")
    while batch.live:
        batch.step()
    assert rows[0].finish == "cancelled" and len(rows[0].tokens) == 1
    (alone, _), = gen.generate_batch([prompts[1]], max_tokens=10, temperature=0)
    assert rows[1].tokens == alone and rows[1].finish == "length"


def test_max_rows_queues_rows_without_changing_results(gen, prompts):
    capped = Generator(gen.model, gen.tokenizer, max_rows=2)
    assert capped.generate_batch(prompts, max_tokens=12, temperature=0) == \
        gen.generate_batch(prompts, max_tokens=12, temperature=0)


def test_same_seed_same_samples_and_other_seeds_differ(gen, prompts):
    kwargs = dict(num_samples=3, max_tokens=16, temperature=1.0)
    a = gen.generate_batch(prompts, seed=7, **kwargs)
    assert gen.generate_batch(prompts, seed=7, **kwargs) == a
    assert gen.generate_batch(prompts, seed=8, **kwargs) != a
    samples = [tuple(tokens) for tokens, _ in a]
    assert len(set(samples)) == len(samples)  # every row draws its own stream


def test_sampling_cuts(gen, prompts):
    greedy = gen.generate_batch(prompts, max_tokens=12, temperature=0)
    assert gen.generate_batch(prompts, max_tokens=12, temperature=1.5, top_k=1, seed=0) == greedy
    assert gen.generate_batch(prompts, max_tokens=12, temperature=1.5, top_p=1e-6, seed=0) == greedy
    # mixed per-row settings in one batch: each row follows its own
    rows = [gen.new_row(0, prompts[0], Sampling(12, temperature=0)),
            gen.new_row(1, prompts[1], Sampling(12, temperature=2.0, top_k=1), seed=1),
            gen.new_row(2, prompts[2], Sampling(12, temperature=2.0), seed=1)]
    batch = DecodeBatch(gen.model, gen.tokenizer)
    batch.admit(rows)
    while batch.live:
        batch.step()
    assert rows[0].tokens == greedy[0][0] and rows[1].tokens == greedy[1][0]
    assert rows[2].tokens != greedy[2][0]


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-40, 1e-8, GREEDY_BELOW / 2])
def test_tiny_temperatures_decode_greedily_and_never_give_nan(gen, prompts, temperature):
    """1e-300 is 0 in float32: logits / temperature used to give inf - inf = nan and an IndexError."""
    greedy = gen.generate_batch(prompts, max_tokens=8, temperature=0)
    assert gen.generate_batch(prompts, max_tokens=8, temperature=temperature, seed=3) == greedy
    logits = torch.tensor([[0.0, 1.0, 1.0 - 1e-6, -50.0]])  # the near-tie still goes to the argmax
    assert BatchSampler([Sampling(1, temperature=temperature)], [None], torch.device("cpu"))(logits).tolist() == [1]


def test_for_inference_fp32_decodes_exactly_like_the_plain_model(artifact, gen, prompts):
    """Its DecodeHead computes only the last position during a prefill: same caches, same tokens."""
    model, _, _ = load_artifact(artifact)
    prepared = Generator(for_inference(model, "fp32"), gen.tokenizer)
    assert prepared.generate_batch(prompts, max_tokens=12, temperature=0) == \
        gen.generate_batch(prompts, max_tokens=12, temperature=0)
    with torch.no_grad():  # outside a prefill it is the plain unembedding
        torch.testing.assert_close(model(torch.tensor([prompts[1]])), gen.model(torch.tensor([prompts[1]])))


def test_bf16_head_keeps_float32_logits_close_to_fp32(artifact, gen, prompts):
    fast, _, _ = load_artifact(artifact)
    assert for_inference(fast, "bf16-head").lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ids = torch.tensor([prompts[1]])
        exact, approx = gen.model(ids), fast(ids)
    assert approx.dtype == torch.float32 and fast.wte.weight.dtype == torch.float32
    torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.02)
    assert not torch.equal(approx, exact)  # it did compute in bfloat16
    (tokens, _), = Generator(fast, gen.tokenizer).generate_batch([prompts[1]], max_tokens=8, temperature=0)
    assert len(tokens) == 8
    with pytest.raises(ValueError, match="precision='fp16'"):
        for_inference(fast, "fp16")
    tied = GPT(GPTConfig.from_depth(1, vocab_size=gen.tokenizer.vocab_size, tie_embeddings=True))
    for_inference(tied, "bf16-head")
    assert tied.precision == "fp32" and tied.lm_head.weight is tied.wte.weight  # still tied


def test_prompt_too_long_for_the_context_is_a_clear_error(gen, prompts):
    context = gen.model.config.sequence_len
    with pytest.raises(ValueError, match=f"exceeds the model's context of {context} tokens"):
        gen.generate([prompts[0]], max_tokens=context)
    with pytest.raises(ValueError, match="non-empty list of token ids"):
        gen.generate([[]], max_tokens=4)
    with pytest.raises(ValueError, match="invalid token ids"):
        gen.generate([[10**6]], max_tokens=4)
    for bad in (dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=0),
                dict(max_tokens=0), dict(num_samples=0), dict(seed=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gen.generate([prompts[0]], **{"max_tokens": 4, **bad})


def test_stop_strings_cut_the_text_and_stop_the_row(gen, prompts):
    (tokens, _), = gen.generate_batch([prompts[1]], max_tokens=30, temperature=0)
    full = gen.complete(prompts[1], max_tokens=30, temperature=0)
    stop = full[10:13]
    cut = full.index(stop)
    assert gen.complete(prompts[1], max_tokens=30, temperature=0, stop=[stop]) == full[:cut]
    (stopped, _), = gen.generate_batch([prompts[1]], max_tokens=30, temperature=0, stop=stop)
    assert stopped == tokens[:len(stopped)] and len(stopped) < len(tokens)


def test_text_stream_holds_back_split_characters_and_possible_stops():
    pieces = [b"ab", b"\xe2\x82", b"\xac", b"S", b"T", b"OP", b"x"]
    text = TextStream(pieces, stop=["STOP"])
    out = []
    for t in (0, 1):
        text.push(t)
        out.append(text.take())
    assert out == ["ab", ""]  # half a euro sign is held
    text.push(2)
    assert text.take() == "\u20ac"
    text.push(3)
    text.push(4)
    assert text.take() == "" and not text.stopped  # "ST" could start "STOP"
    text.push(6)
    assert text.take() == "STx"  # it didn't
    text.push(3), text.push(4), text.push(5)
    assert text.take() == "" and text.stopped


class ScriptedModel(GPT):
    """A GPT whose 'choice' at each step is scripted: it plays `plan` token by token, but lets the
    engine's forced tool output pass (it plans nothing while output_start..output_end is fed in)."""

    def __init__(self, config, tokenizer, plan):
        super().__init__(config)
        self.plan, self.tok = deque(plan), tokenizer
        self.in_output = False

    def forward(self, idx, kv_cache=None, **kwargs):
        logits = super().forward(idx, kv_cache=kv_cache, **kwargs)
        fed = idx[0, -1].item()
        sid = self.tok.special_id
        if fed == sid("output_start"):
            self.in_output = True
        elif fed == sid("output_end"):
            self.in_output = False
        passive = self.in_output or fed == sid("python_end")
        choice = 0 if passive or idx.size(1) > 1 or not self.plan else self.plan.popleft()
        out = torch.full_like(logits, -100.0)
        out[..., choice] = 100.0
        return out


def scripted(gen, text_before, expr, text_after, tool=calculate):
    tok, sid = gen.tokenizer, gen.tokenizer.special_id
    plan = [*tok.encode(text_before), sid("python_start"), *tok.encode(expr), sid("python_end"),
            *tok.encode(text_after), sid("assistant_end")]
    model = ScriptedModel(gen.model.config, tok, plan)
    return Generator(model, tok, tool=tool)


def tool_output(gen, scripted_gen) -> tuple[str, str]:
    """(the forced tool output, the text after it) of one scripted chat reply."""
    tok, sid = gen.tokenizer, gen.tokenizer.special_id
    prompt = [tok.bos_id, sid("user_start"), *tok.encode("hi"), sid("user_end"), sid("assistant_start")]
    (tokens, forced), = scripted_gen.generate_batch([prompt], max_tokens=80, temperature=0)
    start, end = tokens.index(sid("output_start")), tokens.index(sid("output_end"))
    assert forced[start:end + 1] == [True] * (end + 1 - start)
    return tok.decode(tokens[start + 1:end]), tok.decode(tokens[end + 1:])


@pytest.mark.parametrize("expr, result", [("48/2", "24"), ("__import__('os')", "Error: ")])
def test_calculator_output_is_forced_and_generation_goes_on(gen, expr, result):
    tok, sid = gen.tokenizer, gen.tokenizer.special_id
    scripted_gen = scripted(gen, "so ", expr, " done")
    prompt = [tok.bos_id, sid("user_start"), *tok.encode("hi"), sid("user_end"), sid("assistant_start")]
    (tokens, forced), = scripted_gen.generate_batch([prompt], max_tokens=80, temperature=0)
    start, end = tokens.index(sid("output_start")), tokens.index(sid("output_end"))
    assert tokens[start - 1] == sid("python_end")
    assert forced == [start <= i <= end for i in range(len(tokens))]  # exactly the tool output is forced
    assert tok.decode(tokens[start + 1:end]).startswith(result)
    assert tok.decode(tokens[end + 1:]) == " done<|assistant_end|>"  # the model kept going after the call
    text = scripted(gen, "so ", expr, " done").complete(prompt, max_tokens=80, temperature=0)  # a fresh script
    assert text.startswith(f"so <<{expr}={result}") and text.endswith(">> done")
    parts = scripted_gen.to_parts(tokens)
    assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
    assert parts[1]["text"] == expr and parts[3]["text"] == " done"


@pytest.mark.parametrize("expr, shown", [("'\\ud800'", "\ufffd"), ("'x\\udcff' * 2", "x\ufffdx\ufffd"),
                                         ("'\\ud83d' + '\\ude00'", "\U0001f600")])
def test_a_tool_result_that_is_not_valid_utf8_is_forced_in_as_encodable_text(gen, expr, shown):
    """A string literal can evaluate to lone surrogates, which sentencepiece refuses: they become U+FFFD
    (a pair that belongs together is joined) and the row keeps decoding."""
    with pytest.raises(UnicodeEncodeError):
        calculate(expr).encode("utf-8")
    output, after = tool_output(gen, scripted(gen, "so ", expr, " done"))
    assert output == shown and after == " done<|assistant_end|>"


@pytest.mark.parametrize("tool, shown", [(lambda expr: 1 / 0, "Error: ZeroDivisionError"),
                                         (lambda expr: None, "Error: the tool answered NoneType, not text")])
def test_a_tool_that_raises_or_answers_no_text_answers_an_error_and_the_row_goes_on(gen, tool, shown):
    output, after = tool_output(gen, scripted(gen, "so ", "2+2", " done", tool=tool))
    assert output == shown and after == " done<|assistant_end|>"


def test_a_row_that_fails_fails_alone_and_the_others_decode_as_if_alone(gen, prompts):
    """Row 1 samples from nan logits, row 2's text processing raises: both finish with finish="error"
    and a reason, rows 0 and 3 carry on exactly as they decode on their own."""
    settings = [Sampling(12, temperature=0), Sampling(12, temperature=0.8), Sampling(12, temperature=0),
                Sampling(12, temperature=0)]
    rows = [gen.new_row(i, p, s, seed=i) for i, (p, s) in enumerate(zip(prompts, settings))]
    batch = DecodeBatch(PoisonedRow(gen.model, 1, width=4), gen.tokenizer)
    batch.admit(rows)
    batch.step()
    rows[2].text.push = lambda token: 1 / 0
    while batch.live:
        batch.step()
    assert rows[1].finish == "error" and "not finite" in rows[1].error and len(rows[1].tokens) == 0
    assert rows[2].finish == "error" and "ZeroDivisionError" in rows[2].error and len(rows[2].tokens) == 2
    for i in (0, 3):
        (alone, _), = gen.generate_batch([prompts[i]], max_tokens=12, temperature=0)
        assert rows[i].tokens == alone and rows[i].finish == "length"
    poisoned = Generator(PoisonedRow(gen.model, 0, width=1), gen.tokenizer)
    with pytest.raises(RuntimeError, match="generation failed for row 0: FloatingPointError"):
        poisoned.generate_batch(prompts[:1], max_tokens=4, temperature=1.0)  # a library caller hears of it


def test_logprobs_are_the_models_log_softmax_of_prompt_and_generated_tokens(gen, prompts):
    prompt = prompts[1]
    scored = gen.score(prompt, top=3)
    with torch.no_grad():
        expected = gen.model(torch.tensor([prompt]))[0].double().log_softmax(dim=-1)
    assert scored[0] is None and len(scored) == len(prompt)
    for i, entry in enumerate(scored[1:], 1):
        assert entry.token == prompt[i] and abs(entry.logprob - expected[i - 1, prompt[i]].item()) < 1e-4
        assert [t for t, _ in entry.top] == expected[i - 1].topk(3).indices.tolist()
        assert all(abs(lp - expected[i - 1, t].item()) < 1e-4 for t, lp in entry.top)
    # decoded with the cache, each generated token's logprob is what scoring the whole sequence gives
    asking = gen.new_row(0, prompt, Sampling(10, temperature=0), logprobs=2)
    quiet = gen.new_row(1, prompts[0], Sampling(10, temperature=0))
    batch = DecodeBatch(gen.model, gen.tokenizer)
    batch.admit([asking, quiet])
    while batch.live:
        batch.step()
    assert quiet.logprobs_out == []  # a row that doesn't ask costs nothing and gets nothing
    offsets, got = zip(*asking.logprobs_out)
    full = gen.score(prompt + asking.tokens, top=2)[len(prompt):]
    assert [g.token for g in got] == asking.tokens == [f.token for f in full]
    for g, f in zip(got, full):
        assert abs(g.logprob - f.logprob) < 1e-4 and g.top[0][0] == g.token  # greedy: the token is the best
        assert [t for t, _ in g.top] == [t for t, _ in f.top]
    assert offsets[0] == 0 and list(offsets) == sorted(offsets) and offsets[-1] <= len(asking.text.take())
    with pytest.raises(ValueError, match="logprobs=-1"):
        gen.new_row(0, prompt, Sampling(4), logprobs=-1)


def test_streaming_yields_one_token_per_live_row_per_step(gen, prompts):
    steps = list(gen.generate(prompts[:2], num_samples=2, max_tokens=5, temperature=0))
    assert len(steps) == 5
    assert all([t.row for t in step] == [0, 1, 2, 3] for step in steps)
    assert [t.finish for t in steps[-1]] == ["length"] * 4 and all(t.finish is None for t in steps[0])


def chat_cli(artifact, *args, stdin: str = "") -> str:
    cmd = [sys.executable, "-m", "llm.chat", f"source={artifact}", "temperature=0", "max_tokens=12",
           "precision=fp32", *args]
    # bytes, not text=True: universal newlines would turn a "\r" the model wrote into "\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, input=stdin.encode(), capture_output=True, check=True, timeout=120)
    return done.stdout.decode()


def test_chat_cli_answers_one_prompt_and_exits(gen, artifact):
    expected = ChatSession(gen, Sampling(max_tokens=12, temperature=0)).reply("What is a list?", lambda s: None)
    assert chat_cli(artifact, "prompt=What is a list?") == expected + "\n"


def test_chat_cli_keeps_the_conversation_until_cleared(gen, artifact):
    session = ChatSession(gen, Sampling(max_tokens=12, temperature=0))
    first = session.reply("hello", lambda s: None)
    second = session.reply("and then?", lambda s: None)
    assert second != first  # the history changed the prompt
    out = chat_cli(artifact, stdin="hello\nand then?\nclear\nhello\nquit\n")
    answers = [part.split("\n\nYou: ")[0] for part in out.split("Assistant: ")[1:]]
    assert answers == [first, second, first] and "(new conversation)" in out
