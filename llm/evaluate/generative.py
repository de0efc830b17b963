"""Generative chat evaluation (GSM8K, HumanEval, ...): sample an answer, then check it.

The model answers each prompt (the conversation up to <|assistant_start|>) through the Generator, with
its calculator tool; nanochat's settings by default: one greedy sample of up to 512 tokens, pass@1.
With num_samples > 1 a problem counts as solved when any sample is right (pass@k).

A completion is read as display text: it ends at <|assistant_end|> (or <|bos|>), and a tool call
shows in GSM8K's own notation, `<<expr=result>>`, so "... <<48/2=24>>24 ... #### 72" is checked the
way GSM8K's references are. HumanEval completions are programs: they run in the execution sandbox
(llm.evaluate.sandbox), several at a time in threads, and a failure of any kind (wrong answer, crash,
timeout, memory, forbidden syscall) is just a failed problem.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from llm.evaluate.results import Accuracy, TaskResult
from llm.evaluate.sharding import Shard
from llm.evaluate.sandbox import run_program
from llm.tasks.base import Task
from llm.conversation import Conversation
from llm.tasks.humaneval import HumanEval
from llm.tokenizer import Tokenizer

# How the special tokens of a completion read in its text: tool calls as GSM8K's <<expr=result>>.
TOOL_TEXT = {"python_start": b"<<", "python_end": b"=", "output_start": b"", "output_end": b">>"}
STOP_TOKENS = ("assistant_end", "bos")


class BatchGenerator(Protocol):
    """What the evaluator needs of llm.generate.engine.Generator."""

    def generate_batch(self, prompts: Sequence[Sequence[int]], num_samples: int = 1,
                       **kwargs) -> list[tuple[list[int], list[bool]]]: ...


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 512
    temperature: float = 0.0
    top_k: int | None = 50
    num_samples: int = 1
    seed: int = 42

    def __post_init__(self):
        if self.max_tokens < 1 or self.num_samples < 1:
            raise ValueError(f"max_tokens={self.max_tokens} and num_samples={self.num_samples} must be >= 1")


@dataclass(frozen=True)
class SandboxSettings:
    timeout_s: float = 5.0
    memory_mb: int = 1024
    workers: int = 4


def completion_text(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The display text of generated ids: up to the first stop token, tool calls as <<expr=result>>."""
    stops = {tokenizer.special_id(name) for name in STOP_TOKENS}
    shown = {tokenizer.special_id(name): text for name, text in TOOL_TEXT.items()}
    hidden = {tokenizer.special_id(name) for name in ("user_start", "user_end", "assistant_start")}
    pieces: list[bytes] = []
    for token in ids:
        token = int(token)
        if token in stops:
            break
        if token in shown:
            pieces.append(shown[token])
        elif token not in hidden:
            pieces.append(tokenizer.decode_bytes([token]))
    return b"".join(pieces).decode("utf-8", errors="replace")


def sample_completions(generator: BatchGenerator, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                       settings: GenerationSettings, context: int | None, seed: int) -> list[list[str]]:
    """settings.num_samples completion texts per prompt.

    A prompt gets at most the tokens left in the model's context; prompts with the same budget share a
    generate_batch call. A prompt that fills the context on its own gets empty answers (a failed problem).
    """
    budgets = [settings.max_tokens if context is None else min(settings.max_tokens, context - len(p))
               for p in prompts]
    texts: list[list[str]] = [[""] * settings.num_samples for _ in prompts]
    for budget in sorted({b for b in budgets if b >= 1}):
        members = [i for i, b in enumerate(budgets) if b == budget]
        rows = generator.generate_batch([prompts[i] for i in members], num_samples=settings.num_samples,
                                        max_tokens=budget, temperature=settings.temperature,
                                        top_k=settings.top_k, seed=seed + members[0] * settings.num_samples)
        for j, i in enumerate(members):
            samples = rows[j * settings.num_samples:(j + 1) * settings.num_samples]
            texts[i] = [completion_text(tokenizer, ids) for ids, _ in samples]
    return texts


Checker = Callable[[Sequence[Conversation], Sequence[list[str]]], list[bool]]


def task_checker(task: Task) -> Checker:
    """Solved or not, per conversation: right when any of its samples passes task.check."""
    def check(conversations, samples):
        return [any(task.check(c, s) for s in ss) for c, ss in zip(conversations, samples)]
    return check


def humaneval_checker(sandbox: SandboxSettings) -> Checker:
    """Solved or not, per problem: any sample's program exits cleanly in the sandbox."""
    def passes(job: tuple[Conversation, str]) -> bool:
        conversation, completion = job
        result = run_program(HumanEval.program(conversation, completion), timeout_s=sandbox.timeout_s,
                             memory_mb=sandbox.memory_mb)
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


def evaluate_generative(generator: BatchGenerator, tokenizer: Tokenizer, task: Task, batch_size: int = 8,
                        shard: Shard = Shard(), settings: GenerationSettings = GenerationSettings(),
                        sandbox: SandboxSettings = SandboxSettings(), progress: bool = True) -> TaskResult:
    """Share of `task`'s problems solved (this rank's batches, summed over ranks). Chance is 0."""
    if task.eval_type != "generative":
        raise ValueError(f"task {task.name!r} is {task.eval_type!r}, not generative")
    metric, check = Accuracy().to(shard.device), checker_for(task, sandbox)
    context = getattr(generator, "context", None)
    for batch in shard.progress(shard.batches(len(task), batch_size), task.name, progress):
        conversations = [task[i] for i in batch]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        samples = sample_completions(generator, tokenizer, prompts, settings, context,
                                     seed=settings.seed + batch.start * settings.num_samples)
        metric.update(check(conversations, samples))
    correct, total = metric.compute()
    return TaskResult(task.name, "generative", correct, total, 0.0)
