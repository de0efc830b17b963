"""
Multiple-choice questions (ARC, MMLU) rendered as nanochat renders them, scored categorically.

The evaluator compares the model's logits for the choice letters only, so a conversation carries its
`letters`; the reference assistant message is the right letter alone.
"""

from collections.abc import Sequence

from llm.tasks.base import Task
from llm.conversation import Conversation, last_assistant, text_of


def render_mc(question: str, letters: Sequence[str], choices: Sequence[str]) -> str:
    """
    The user message of a multiple-choice question.

    As in nanochat: the letter comes *after* its choice ("- Paris=A"), which small models bind
    better, with no space before the letter, so the prompt holds the very token the answer uses
    ("A", not " A").
    """
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices: {list(letters)}")
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def mc_conversation(question: str, letters: Sequence[str], choices: Sequence[str], answer: str,
                    **metadata) -> Conversation:
    """A multiple-choice conversation: the rendered question, the answer letter, and its letters."""
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {list(letters)}")
    return {
        "messages": [
            {"role": "user", "content": render_mc(question, letters, choices)},
            {"role": "assistant", "content": answer},
        ],
        "letters": list(letters),
        **metadata,
    }


class MultipleChoiceTask(Task):
    """Categorical scoring: the answer is one of the example's letters, right if it is the reference's."""

    eval_type = "categorical"

    def check(self, conversation: Conversation, answer: str) -> bool:
        letters = conversation["letters"]
        answer = answer.strip()
        if answer not in letters:
            raise ValueError(f"{self.name} answer {answer!r} is not one of the choice letters {letters}")
        return answer == text_of(last_assistant(conversation)["content"])
