"""Generative chat evaluation (GSM8K, HumanEval, ...): sample an answer, then check it.

The model answers each prompt (the conversation up to <|assistant_start|>) through the Generator, with
its calculator tool; nanochat's settings by default: one greedy sample of up to 512 tokens, pass@1.
With num_samples > 1 a problem counts as solved when any sample is right (pass@k).

A completion is read as display text: it ends at <|assistant_end|> (or <|bos|>), and a tool call
shows in GSM8K's own notation, `<<expr=result>>`, so "... <<48/2=24>>24 ... #### 72" is checked the
way GSM8K's references are. HumanEval completions are programs: they run in the execution sandbox
(llm.evaluate.sandbox), several at a time in threads, with the problem's tests run by the sandbox's
harness; a failure of any kind (wrong answer, crash, early exit, timeout, memory, forbidden syscall)
is just a failed problem. A machine that cannot give the sandbox its namespaces refuses before any
sampling, unless sandbox.allow_weaker=true.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from llm.conversation import Conversation
from llm.evaluate.results import Accuracy, TaskResult
from llm.evaluate.sandbox import require_sandbox, run_tests
from llm.evaluate.sharding import Shard
from llm.generate.engine import generate_answers
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.tasks.base import Task
from llm.tasks.humaneval import HumanEval
from llm.tokenizer import Tokenizer


class BatchGenerator(Protocol):
    """What the evaluator needs of llm.generate.engine.Generator (see generate_answers)."""
    context: int

    def generate_batch(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[tuple[list[int], list[bool]]]: ...


@dataclass(frozen=True)
class SandboxSettings:
    """conf/eval.yaml's sandbox section."""
    timeout_s: float
    memory_mb: int
    workers: int  # programs run at once
    allow_weaker: bool  # run without bubblewrap's namespaces (or seccomp) where they are missing


def sample_completions(generator: BatchGenerator, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                       sampling: Sampling) -> list[list[str]]:
    """sampling.num_samples completion texts per prompt (a prompt that fills the context gets empty ones:
    a failed problem)."""
    return [[completion_text(tokenizer, ids) for ids, _ in answers]
            for answers in generate_answers(generator, prompts, sampling)]


Checker = Callable[[Sequence[Conversation], Sequence[list[str]]], list[bool]]


def task_checker(task: Task) -> Checker:
    """Solved or not, per conversation: right when any of its samples passes task.check."""
    def check(conversations, samples):
        return [any(task.check(c, s) for s in ss) for c, ss in zip(conversations, samples)]
    return check


def humaneval_checker(sandbox: SandboxSettings) -> Checker:
    """Solved or not, per problem: any sample's code passes the problem's tests in the sandbox.
    Raises SandboxUnavailable at once where this machine lacks the sandbox (and allow_weaker is off)."""
    require_sandbox(sandbox.allow_weaker)

    def passes(job: tuple[Conversation, str]) -> bool:
        conversation, completion = job
        result = run_tests(HumanEval.program(conversation, completion), timeout_s=sandbox.timeout_s,
                           memory_mb=sandbox.memory_mb, allow_weaker=sandbox.allow_weaker)
        return result.success

    def check(conversations, samples):
        jobs = [(c, s) for c, ss in zip(conversations, samples) for s in ss]
        with ThreadPoolExecutor(max(1, sandbox.workers)) as pool:
            outcomes = list(pool.map(passes, jobs))
        k = len(samples[0]) if samples else 1
        return [any(outcomes[i * k:(i + 1) * k]) for i in range(len(conversations))]
    return check


def checker_for(task: Task, sandbox: SandboxSettings) -> Checker:
    return humaneval_checker(sandbox) if isinstance(task, HumanEval) else task_checker(task)


def evaluate_generative(generator: BatchGenerator, tokenizer: Tokenizer, task: Task, sampling: Sampling,
                        sandbox: SandboxSettings, batch_size: int = 8, shard: Shard = Shard(),
                        progress: bool = True) -> TaskResult:
    """Share of `task`'s problems solved (this rank's batches, summed over ranks). Chance is 0.
    A batch's samples are seeded from sampling.seed and the batch's place, so ranks change nothing."""
    if task.eval_type != "generative":
        raise ValueError(f"task {task.name!r} is {task.eval_type!r}, not generative")
    metric, check = Accuracy().to(shard.device), checker_for(task, sandbox)
    seed, n = (sampling.seed or 0), sampling.num_samples
    for batch in shard.progress(shard.batches(len(task), batch_size), task.name, progress):
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        samples = sample_completions(generator, tokenizer, prompts, replace(sampling, seed=seed + batch.start * n))
        metric.update(check(conversations, samples))
    correct, total = metric.compute()
    return TaskResult(task.name, "generative", correct, total, 0.0)
