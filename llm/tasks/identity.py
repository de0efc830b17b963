"""
Identity conversations: who the model is, who made it, what it can and cannot do.

The package ships llm/tasks/data/identity.jsonl, hand-written with `{name}` and `{maker}`
placeholders filled from the constructor, so a fork can rename its model without new data.
Any other JSONL (same format as CustomJSON) can be given as `path`.
"""

from pathlib import Path

from llm.conversation import Conversation, content_parts
from llm.tasks.customjson import CustomJSON
from llm.tasks.hub import DATA_DIR

IDENTITY_PATH = DATA_DIR / "identity.jsonl"


def _fill(text: str, name: str, maker: str) -> str:
    # str.replace, not str.format: conversations may hold other braces (code, JSON)
    return text.replace("{name}", name).replace("{maker}", maker)


class Identity(CustomJSON):
    name = "identity"

    def __init__(self, split: str = "train", *, name: str = "nanochat", maker: str = "the nanochat-lightning project",
                 path: str | Path = IDENTITY_PATH, **view):
        self.model_name, self.maker = name, maker
        super().__init__(path, split, **view)

    def to_conversation(self, conversation: Conversation) -> Conversation:
        fill = lambda text: _fill(text, self.model_name, self.maker)  # noqa: E731
        messages = []
        for m in conversation["messages"]:
            if isinstance(m["content"], str):
                content = fill(m["content"])
            else:
                content = [{**p, "text": fill(p["text"])} for p in content_parts(m["content"])]
            messages.append({"role": m["role"], "content": content})
        return {**conversation, "messages": messages}
