"""Generative evaluation: GSM8K answers with tool calls, HumanEval in the sandbox, through the evaluator path."""

from __future__ import annotations

import itertools
import os
import uuid
from dataclasses import replace

import pytest

from eval_support import ScriptedGenerator, make_model, make_tokenizer
from llm.evaluate.generative import evaluate_generative
from llm.evaluate.sandbox import SandboxSettings
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.tasks import build_task
from llm.tasks.gsm8k import GSM8K, read_vendored
from llm.tasks.humaneval import HumanEval

GREEDY = Sampling(max_tokens=512, temperature=0.0, top_k=50, seed=42)  # conf/eval.yaml's generation on a GPU
SANDBOX = SandboxSettings(timeout_s=5.0, memory_mb=1024, workers=4, allow_weaker=False)


def evaluate(generator, tokenizer, task, sampling=GREEDY, sandbox=SANDBOX, **kwargs):
    return evaluate_generative(generator, tokenizer, task, sampling, sandbox, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def reference_reply(tokenizer, conversation) -> list[int]:
    """The tokens a perfect model writes (tool calls and the tool's forced outputs included)."""
    ids, _ = tokenizer.render_conversation(conversation)
    return ids[len(tokenizer.render_for_completion(conversation)):]


def replies_by_prompt(tokenizer, task, reply) -> ScriptedGenerator:
    """A generator answering each of the task's prompts with reply(conversation) (text or token ids)."""
    table = {}
    for conversation in task:
        out = reply(conversation)
        if isinstance(out, str):
            out = tokenizer.encode(out) + [tokenizer.special_id("assistant_end")]
        table[tuple(tokenizer.render_for_completion(conversation))] = out
    return ScriptedGenerator(lambda prompt: table[tuple(prompt)])


def test_completion_text_shows_tool_calls_like_gsm8k_and_stops_at_the_end(tokenizer):
    sid = tokenizer.special_id
    ids = (tokenizer.encode("She sold ") + [sid("python_start")] + tokenizer.encode("48/2") + [sid("python_end"),
           sid("output_start")] + tokenizer.encode("24") + [sid("output_end")] + tokenizer.encode("24 clips.\n#### 24")
           + [sid("assistant_end")] + tokenizer.encode("ignored 99"))
    assert completion_text(tokenizer, ids) == "She sold <<48/2=24>>24 clips.\n#### 24"
    assert completion_text(tokenizer, tokenizer.encode("7") + [tokenizer.bos_id, 5]) == "7"


def test_gsm8k_real_references_extract_and_score():
    task = GSM8K("test", shuffle_seed=None)
    raw = read_vendored("test")
    assert len(task) == len(raw) == 1319
    # every real reference, in its `<<expr=result>> ... #### N` form, scores right against itself
    assert all(task.check(task[i], raw[i]["answer"]) for i in range(len(raw)))
    assert not task.check(task[0], raw[1]["answer"].split("####")[0] + "#### 1000001")


def test_gsm8k_through_the_evaluator_with_tool_calls(tokenizer):
    task = GSM8K("test")[:12]
    perfect = replies_by_prompt(tokenizer, task, lambda c: reference_reply(tokenizer, c))
    result = evaluate(perfect, tokenizer, task, batch_size=5, progress=False)
    assert (result.correct, result.total, result.chance) == (12, 12, 0.0)
    assert perfect.calls and all(s.temperature == 0.0 and s.max_tokens == 512 for _, s in perfect.calls)

    def answer(c):
        return c["messages"][-1]["content"][-1]["text"].split("####")[1].strip()

    def number(c):
        return int(answer(c).replace(",", ""))

    off_by_one = replies_by_prompt(tokenizer, task, lambda c: f"Let me think.\n#### {number(c) + 1}")
    assert evaluate(off_by_one, tokenizer, task, progress=False).correct == 0
    # model-style answers: no "####", the last number counts; a "$" and thousands commas are fine
    chatty = replies_by_prompt(tokenizer, task, lambda c: f"So the total is ${number(c):,}.")
    assert evaluate(chatty, tokenizer, task, progress=False).correct == 12

    def tool_then_wrong(c):  # the right number only inside the tool output, then a wrong final answer
        sid = tokenizer.special_id
        return ([sid("python_start")] + tokenizer.encode("1+1") + [sid("python_end"), sid("output_start")]
                + tokenizer.encode(answer(c)) + [sid("output_end")] + tokenizer.encode(" so #### 0.5")
                + [sid("assistant_end")])
    assert evaluate(replies_by_prompt(tokenizer, task, tool_then_wrong), tokenizer, task,
                               progress=False).correct == 0


def test_pass_at_k_counts_a_problem_solved_by_any_sample(tokenizer):
    task = GSM8K("test")[:3]
    answers = {tuple(tokenizer.render_for_completion(c)): reference_reply(tokenizer, c) for c in task}
    turn = itertools.count()
    # every even-numbered call is wrong, every odd one right: with 2 samples each problem gets one of each
    generator = ScriptedGenerator(lambda p: answers[tuple(p)] if next(turn) % 2 else tokenizer.encode("#### -1"))
    one = evaluate(generator, tokenizer, task, sampling=GREEDY, progress=False)
    two = evaluate(generator, tokenizer, task, sampling=replace(GREEDY, num_samples=2), progress=False)
    assert one.correct < 3 and two.correct == 3


def test_prompts_longer_than_the_context_fail_without_generating(tokenizer):
    task = GSM8K("test")[:3]
    generator = ScriptedGenerator(lambda p: tokenizer.encode("#### 1"))
    generator.context = 16  # every GSM8K prompt is longer
    result = evaluate(generator, tokenizer, task, progress=False)
    assert (result.correct, result.total) == (0, 3) and generator.calls == []
    generator.context = 10_000
    evaluate(generator, tokenizer, task, sampling=replace(GREEDY, max_tokens=64), progress=False)
    assert all(sampling.max_tokens == 64 for _, sampling in generator.calls)


def test_humaneval_evaluator_runs_programs_in_the_sandbox_and_carries_on(tokenizer):
    task = HumanEval(shuffle_seed=None)[:8]  # HumanEval/0 .. /7
    escape = f"/tmp/llm-eval-escape-{uuid.uuid4().hex}"
    fence = "```python\n{}\n```"

    def reply(c):
        number, body = int(c["task_id"].split("/")[1]), c["canonical_solution"]
        full = c["prompt"] + body
        return {
            0: body,  # the function body, continuing the prompt
            1: fence.format(f"open({escape!r}, 'w').write('x')\n{full}"),  # writes outside its directory
            2: "    return number % 1.0 + 1.0\n",  # truncate_number, off by one
            3: fence.format("import os\nwhile True:\n    os.fork()"),  # fork loop
            4: "Here it is:\n" + fence.format(full),  # the whole function, fenced, after some chat
            5: fence.format("import time\nwhile True:\n    time.sleep(1)"),  # sleeps forever
            6: fence.format("x = bytearray(10 * 1024 ** 3)\nprint(len(x))"),  # allocates 10 GB
            7: body,
        }[number]

    generator = replies_by_prompt(tokenizer, task, reply)
    result = evaluate(generator, tokenizer, task, batch_size=3, progress=False,
                                 sandbox=SandboxSettings(timeout_s=3, memory_mb=512, workers=4, allow_weaker=False))
    assert (result.correct, result.total) == (3, 8)  # 0, 4 and 7: the evaluator carried on past the failures
    assert not os.path.exists(escape)


def test_off_by_one_fails_where_the_canonical_solution_passes(tokenizer):
    task = HumanEval(shuffle_seed=None)[23:24]  # strlen
    assert task[0]["entry_point"] == "strlen"
    for body, solved in (("    return len(string)\n", 1), ("    return len(string) + 1\n", 0)):
        result = evaluate(replies_by_prompt(tokenizer, task, lambda c: body), tokenizer, task,
                                     progress=False)
        assert result.correct == solved


def test_a_real_generator_runs_end_to_end(tokenizer):
    from llm.generate.engine import Generator

    model = make_model(tokenizer, sequence_len=512)
    task = build_task("gsm8k", "test")[:3]
    sampling = replace(GREEDY, max_tokens=8)
    results = [evaluate(Generator(model, tokenizer), tokenizer, task, batch_size=b, sampling=sampling,
                                   progress=False) for b in (1, 3)]
    assert results[0].total == 3 and results[0] == results[1]
