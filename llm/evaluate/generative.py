"""Generative chat evaluation (GSM8K, HumanEval, ...): sample an answer, then check it.

The model answers each prompt (the conversation up to <|assistant_start|>) through the Generator, with
its calculator tool; nanochat's settings by default: one greedy sample of up to 512 tokens, pass@1.
With num_samples > 1 a problem counts as solved when any sample is right (pass@k).

A completion is read as display text: it ends at <|assistant_end|> (or <|bos|>), and a tool call shows
in GSM8K's own notation, `<<expr=result>>`, so "... <<48/2=24>>24 ... #### 72" is checked the way
GSM8K's references are. HumanEval completions are programs: they run in the execution sandbox
(llm.evaluate.sandbox; the task says so, HumanEval.check_samples), several at a time in threads, with
the problem's tests run by the sandbox's harness; a failure of any kind (wrong answer, crash, early
exit, timeout, memory, forbidden syscall) is just a failed problem. A machine that cannot give the
sandbox its namespaces refuses before any sampling, unless sandbox.allow_weaker=true.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Protocol

from llm.evaluate.results import Accuracy, TaskResult
from llm.evaluate.sandbox import SandboxSettings
from llm.evaluate.sharding import Shard
from llm.generate.engine import generate_answers
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.tasks.base import Task
from llm.tokenizer import Tokenizer


class BatchGenerator(Protocol):
    """What the evaluator needs of llm.generate.engine.Generator (see generate_answers)."""
    context: int

    def generate_batch(self, prompts: Sequence[Sequence[int]],
                       sampling: Sampling) -> list[tuple[list[int], list[bool]]]: ...


def sample_completions(generator: BatchGenerator, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                       sampling: Sampling) -> list[list[str]]:
    """sampling.num_samples completion texts per prompt (a prompt that fills the context gets empty ones:
    a failed problem)."""
    return [[completion_text(tokenizer, ids) for ids, _ in answers]
            for answers in generate_answers(generator, prompts, sampling)]


def evaluate_generative(generator: BatchGenerator, tokenizer: Tokenizer, task: Task, sampling: Sampling,
                        sandbox: SandboxSettings | None, batch_size: int = 8, shard: Shard = Shard(),
                        progress: bool = True) -> TaskResult:
    """Share of `task`'s problems solved (this rank's batches, summed over ranks). Chance is 0. The task
    checks its answers (Task.check_samples; a task that runs code does so in the sandbox). A batch's
    samples are seeded from sampling.seed and the batch's place, so ranks change nothing."""
    if task.eval_type != "generative":
        raise ValueError(f"task {task.name!r} is {task.eval_type!r}, not generative")
    if task.runs_code and sandbox is None:
        raise ValueError(f"task {task.name!r} runs model-written code: give the sandbox settings (conf/eval.yaml)")
    metric = Accuracy().to(shard.device)
    seed, n = (sampling.seed or 0), sampling.num_samples
    for batch in shard.progress(shard.batches(len(task), batch_size), task.name, progress):
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        samples = sample_completions(generator, tokenizer, prompts, replace(sampling, seed=seed + batch.start * n))
        metric.update(task.check_samples(conversations, samples, sandbox))
    correct, total = metric.compute()
    return TaskResult(task.name, "generative", correct, total, 0.0)
