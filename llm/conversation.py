"""
The conversation schema every task yields, the tokenizer renders and the server receives.

A conversation is a plain JSON-friendly dict (it goes over HTTP too):

    {"messages": [
        {"role": "system", "content": "You are terse."},          # optional, first only
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [                          # str, or a list of parts
            {"type": "text", "text": "2+3 = "},
            {"type": "python", "text": "2+3"},                      # a tool call the model writes
            {"type": "python_output", "text": "5"},                 # the tool's output, forced in
            {"type": "text", "text": "5.\n#### 5"},
        ]},
    ],
     ...}                                                           # task metadata (letters, ...)

After the optional system message, roles alternate user, assistant, user, ... and the last
message may be either (a conversation ending in a user turn is a prompt). Keys other than
"messages" are task metadata (e.g. "letters" for multiple choice) and are left alone.
"""

from typing import Any

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")

Part = dict[str, str]
Message = dict[str, Any]
Conversation = dict[str, Any]


def _check_parts(index: int, content: list) -> None:
    if not content:
        raise ValueError(f"message {index} (assistant) has an empty list of parts; give at least one part")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise ValueError(f"message {index} (assistant) part {j} must be a dict, got {type(part).__name__}")
        kind = part.get("type")
        if kind not in PART_TYPES:
            raise ValueError(f"message {index} (assistant) part {j} has type {kind!r}; valid types: {PART_TYPES}")
        if not isinstance(part.get("text"), str):
            got = type(part.get("text")).__name__
            raise ValueError(f"message {index} (assistant) part {j} ({kind}) needs a str 'text', got {got}")


def _check_message(index: int, message: Any, expected_role: str) -> None:
    if not isinstance(message, dict):
        raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; valid roles: {ROLES}")
    if role != expected_role:
        where = "only the first message may be 'system'" if role == "system" else "roles must alternate user/assistant"
        raise ValueError(f"message {index} has role {role!r} but {expected_role!r} was expected ({where})")
    if "content" not in message:
        raise ValueError(f"message {index} ({role}) has no 'content'")
    content = message["content"]
    if isinstance(content, str):
        return
    if role == "assistant" and isinstance(content, list):
        _check_parts(index, content)
        return
    allowed = "str or a list of parts" if role == "assistant" else "str"
    raise ValueError(f"message {index} ({role}) content must be {allowed}, got {type(content).__name__}")


def validate_conversation(conversation: Any) -> Conversation:
    """Raise ValueError naming the first bad message, role or part; return the conversation unchanged."""
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise ValueError(f"a conversation is a dict with a 'messages' list, got {type(conversation).__name__}")
    messages = conversation["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("conversation['messages'] must be a non-empty list of messages")
    offset = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if offset == len(messages):
        raise ValueError("conversation has only a system message; add a user message after it")
    for i, message in enumerate(messages):
        expected = "system" if i < offset else ("user" if (i - offset) % 2 == 0 else "assistant")
        _check_message(i, message, expected)
    return conversation


def content_parts(content: str | list[Part]) -> list[Part]:
    """Any message content as a list of parts (a plain string is one text part)."""
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def text_of(content: str | list[Part]) -> str:
    """What the assistant *said*: its text parts joined, without tool calls or tool outputs."""
    return "".join(part["text"] for part in content_parts(content) if part["type"] == "text")


def last_assistant(conversation: Conversation) -> Message:
    """The final message, which must be the assistant's (the reference answer of a task example)."""
    message = conversation["messages"][-1]
    if message["role"] != "assistant":
        raise ValueError(f"the conversation should end with an assistant message, it ends with {message['role']!r}")
    return message


def prompt_of(conversation: Conversation) -> Conversation:
    """The conversation without its final assistant message: what a model is asked to complete."""
    last_assistant(conversation)
    return {**conversation, "messages": conversation["messages"][:-1]}
