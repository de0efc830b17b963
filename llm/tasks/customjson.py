"""
Conversations from a JSONL file of your own (nanochat's CustomJSON).

Each non-empty line is either a JSON list of messages, as in nanochat's identity file,
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
or a conversation dict {"messages": [...], ...}. Every line is validated when the file is read,
so a bad line fails early with its line number.
"""

import json
from pathlib import Path

from llm.tasks.base import Task
from llm.conversation import Conversation, validate_conversation


def read_conversations(path: str | Path) -> list[Conversation]:
    """All conversations of a JSONL file, validated; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"conversation file {str(path)!r} does not exist")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                conversation = {"messages": item} if isinstance(item, list) else item
                conversations.append(validate_conversation(conversation))
            except (json.JSONDecodeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: {err}") from err
    return conversations


class CustomJSON(Task):
    """Every conversation of `path`. It has a single split, "train" (all lines)."""

    name = "custom_json"
    splits = ("train",)

    def __init__(self, path: str | Path, split: str = "train", **view):
        self.path = Path(path)
        super().__init__(split, **view)

    def examples(self, split: str) -> list[Conversation]:
        return read_conversations(self.path)

    def to_conversation(self, conversation: Conversation) -> Conversation:
        return dict(conversation)
