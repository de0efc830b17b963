"""
Conversations from a JSONL file of your own (nanochat's CustomJSON).

Each non-empty line is either a JSON list of messages, as in nanochat's identity file,
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
or a conversation dict {"messages": [...], ...}. Every line is validated when the file is read,
so a bad line fails early with one line naming the file, the line number and the fix (BadFileError).
"""

import json
from pathlib import Path

from llm.conversation import Conversation, validate_conversation
from llm.errors import BadFileError, MissingFileError
from llm.tasks.base import Task

LAYOUT = 'each line is one conversation: a JSON list of messages, or {"messages": [...]}'
FIX = f"fix: repair or remove that line ({LAYOUT})"


def read_conversations(path: str | Path) -> list[Conversation]:
    """All conversations of a JSONL file, validated; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"conversation file {str(path)!r} does not exist; fix: give the path of a .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON may hold a raw U+2028
    except UnicodeDecodeError as err:
        raise BadFileError(f"{path}: is not UTF-8 text ({err.reason} at byte {err.start}); fix: write it as "
                           f"UTF-8 JSON lines ({LAYOUT})") from None
    conversations = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            conversation = {"messages": item} if isinstance(item, list) else item
            conversations.append(validate_conversation(conversation))
        except json.JSONDecodeError as err:
            raise BadFileError(f"{path}:{lineno}: not JSON ({err}); {FIX}") from None
        except ValueError as err:
            raise BadFileError(f"{path}:{lineno}: {err}; {FIX}") from None
    if not conversations:
        raise BadFileError(f"{path}: holds no conversations (it is empty); fix: write the conversations into it "
                           f"({LAYOUT}), or leave the task out")
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
