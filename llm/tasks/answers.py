"""
Final numeric answers of math-style tasks (GSM8K, arithmetic, letter counting).

References end with GSM8K's `#### N`; models are taught the same form but may drift, so extraction
falls back to the last number in the text. Answers compare numerically ("72.0" == "72", "1,080" == "1080").
"""

import math
import re

from llm.conversation import Conversation, last_assistant, text_of

# a number: thousands groups "1,080" (only groups of exactly three digits) or plain "-12.5"
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
# GSM8K's marker; a model may put a "$" or spaces before the number
_MARKED = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_ANY_NUMBER = re.compile(_NUMBER)


def extract_answer(text: str) -> str | None:
    """The number after the first `####` (commas stripped); else the last number in the text; else None."""
    marked = _MARKED.search(text)
    if marked:
        return marked.group(1).replace(",", "")
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two extracted answers; None (nothing extracted) never matches."""
    if a is None or b is None:
        return False
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9)


def reference_answer(conversation: Conversation) -> str:
    """The `#### N` number of a reference conversation's final assistant message."""
    text = text_of(last_assistant(conversation)["content"])
    answer = extract_answer(text)
    if answer is None:
        raise ValueError(f"the reference assistant message has no final number: {text[-200:]!r}")
    return answer


def is_correct(conversation: Conversation, completion: str) -> bool:
    """Whether the completion's final number equals the reference's."""
    return numbers_equal(extract_answer(completion), reference_answer(conversation))
