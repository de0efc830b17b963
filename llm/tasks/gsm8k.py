"""
GSM8K: grade-school math word problems with calculator steps (Cobbe et al., 2021).
https://huggingface.co/datasets/openai/gsm8k

The real train (7,473) and test (1,319) splits ship with the package (llm/tasks/data/gsm8k/, MIT,
copyright OpenAI) and are the default source, so training, RL and evaluation run offline.

A reference answer marks calculator steps as `<<expr=result>>`:

    Natalia sold 48/2 = <<48/2=24>>24 clips in May. ... #### 72

which becomes assistant parts, as in nanochat:

    [text "Natalia sold 48/2 = ", python "48/2", python_output "24", text "24 clips in May. ... #### 72"]

so the model learns to call its python tool and the tool's output is forced back in.
"""

import gzip
import json
import re

from llm.tasks.answers import extract_answer, is_correct  # noqa: F401  (extract_answer is part of this module's API)
from llm.tasks.base import Task
from llm.conversation import Conversation, Part
from llm.tasks.hub import DATA_DIR, DataFiles, load_rows

VENDORED_DIR = DATA_DIR / "gsm8k"
_CALCULATOR = re.compile(r"(<<[^>]+>>)")
COLUMNS = {"question": str, "answer": str}


def answer_to_parts(answer: str) -> list[Part]:
    """Split a GSM8K answer at its `<<expr=result>>` spans into text / python / python_output parts."""
    parts: list[Part] = []
    for piece in _CALCULATOR.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def parts_to_answer(parts: list[Part]) -> str:
    """The inverse of answer_to_parts: write tool calls back as `<<expr=result>>` spans."""
    pieces = {"text": "{}", "python": "<<{}=", "python_output": "{}>>"}
    return "".join(pieces[part["type"]].format(part["text"]) for part in parts)


def read_vendored(split: str) -> list[dict]:
    """The shipped split, one dict per problem with `question` and `answer`."""
    path = VENDORED_DIR / f"{split}.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class GSM8K(Task):
    """source: "vendored" (default, the shipped real data), "hub" (openai/gsm8k main), "fixture"; or data_files."""

    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, split: str = "train", *, source: str = "vendored", data_files: DataFiles = None, **view):
        if source not in ("vendored", "hub", "fixture"):
            raise ValueError(f"GSM8K source must be 'vendored', 'hub' or 'fixture', got {source!r}")
        self.source, self.data_files = source, data_files
        super().__init__(split, **view)

    def examples(self, split: str):
        if self.source == "vendored" and self.data_files is None:
            return read_vendored(split)
        source = "hub" if self.source == "vendored" else self.source
        return load_rows(self.name, "openai/gsm8k", "main", split, data_files=self.data_files, source=source,
                         columns=COLUMNS)

    def to_conversation(self, row: dict) -> Conversation:
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": answer_to_parts(row["answer"])},
        ]}

    def check(self, conversation: Conversation, answer: str) -> bool:
        return is_correct(conversation, answer)

    def reward(self, conversation: Conversation, completion: str) -> float:
        return float(is_correct(conversation, completion))
