"""
Arithmetic word problems, generated: the task a tiny model can learn on CPU within minutes in RL.

    user:      Sam has 12 apples and gets 7 more. How many apples does Sam have now?
    assistant: 12 + 7 = [python "12 + 7"] [output "19"] 19
               #### 19

Problems are short on purpose: one operation, small numbers, a few templates, the answer computed by
the python tool and copied after "####". `difficulty` widens them:

    1: + and -, numbers 2..20          2 (default): + and -, numbers 2..99
    3: adds a * b (2..12) and two-step a + b - c

Examples are made deterministically from (split, difficulty, seed, index); train and test use
different seeds, so held-out prompts are fresh draws from the same distribution.
"""

import random
from dataclasses import dataclass

from llm.tasks.answers import is_correct
from llm.tasks.base import LazyExamples, Task
from llm.conversation import Conversation


@dataclass(frozen=True)
class Level:
    max_number: int
    kinds: tuple[str, ...]


LEVELS = {
    1: Level(max_number=20, kinds=("add", "sub")),
    2: Level(max_number=99, kinds=("add", "sub")),
    3: Level(max_number=99, kinds=("add", "sub", "mul", "add_sub")),
}

TEMPLATES = {
    "add": (
        "{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
        "There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?",
        "{name} bought {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} buy in total?",
        "What is {a} plus {b}?",
    ),
    "sub": (
        "{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?",
        "There are {a} {item} on a table. {name} takes {b} of them. How many {item} are left on the table?",
        "{name} had {a} {item} and lost {b}. How many {item} does {name} have now?",
        "What is {a} minus {b}?",
    ),
    "mul": (
        "{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?",
        "What is {a} times {b}?",
    ),
    "add_sub": (
        "{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} does {name} have now?",
    ),
}
NAMES = ("Sam", "Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lily", "Ben", "Emma", "Ravi", "Nina")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "shells", "cards", "eggs")


def _operands(rng: random.Random, kind: str, top: int) -> tuple[str, int]:
    """The python expression of a problem and its value; subtraction never goes below zero."""
    if kind == "add":
        a, b = rng.randint(2, top), rng.randint(2, top)
        return f"{a} + {b}", a + b
    if kind == "sub":
        a, b = sorted((rng.randint(2, top), rng.randint(2, top)), reverse=True)
        return f"{a} - {b}", a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"{a} * {b}", a * b
    a, b = rng.randint(2, top), rng.randint(2, top)
    c = rng.randint(2, a + b)
    return f"{a} + {b} - {c}", a + b - c


class Arithmetic(Task):
    name = "arithmetic"
    eval_type = "generative"

    def __init__(self, split: str = "train", *, size: int = 1000, difficulty: int = 2, seed: int = 0, **view):
        if difficulty not in LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
        self.size, self.difficulty, self.seed = size, difficulty, seed
        super().__init__(split, **view)

    def examples(self, split: str) -> LazyExamples:
        return LazyExamples(self.size, self.make)

    def make(self, index: int) -> dict:
        rng = random.Random(f"{self.name}/{self.split}/{self.difficulty}/{self.seed}/{index}")
        level = LEVELS[self.difficulty]
        kind = rng.choice(level.kinds)
        expression, value = _operands(rng, kind, level.max_number)
        numbers = dict(zip("abc", expression.split()[::2]))
        template = rng.choice(TEMPLATES[kind])
        question = template.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), **numbers)
        return {"question": question, "expression": expression, "answer": value}

    def to_conversation(self, ex: dict) -> Conversation:
        answer = str(ex["answer"])
        return {"messages": [
            {"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": [
                {"type": "text", "text": f"{ex['expression']} = "},
                {"type": "python", "text": ex["expression"]},
                {"type": "python_output", "text": answer},
                {"type": "text", "text": f"{answer}\n#### {answer}"},
            ]},
        ]}

    def check(self, conversation: Conversation, answer: str) -> bool:
        return is_correct(conversation, answer)

    def reward(self, conversation: Conversation, completion: str) -> float:
        """1.0 when the completion's final number is the right result, else 0.0."""
        return float(is_correct(conversation, completion))
