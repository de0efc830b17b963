"""
Spelling and letter counting, generated from the word list the package ships.

- spelling_bee: "How many r are in strawberry?" The assistant spells the word out, counts by hand,
  checks with a python tool call ('strawberry'.count('r')) and ends with "#### 3".
- simple_spelling: "Spell the word: apple" -> "apple:a,p,p,l,e". The part of letter counting that
  is hard for a token-based model (which characters make up a token), drilled on its own.

Examples are made deterministically from (task, split, seed, index), so a task of any size costs
no storage and the same index always gives the same conversation. Every tenth word of the list is
held out for the test split, so test prompts use words the train split never shows.
"""

import random
import string
from functools import lru_cache
from pathlib import Path

from llm.tasks.answers import is_correct
from llm.tasks.base import LazyExamples, Task
from llm.conversation import Conversation, last_assistant, text_of
from llm.tasks.hub import DATA_DIR

WORDS_PATH = DATA_DIR / "words.txt"
TEST_EVERY = 10  # word i is a test word when i % TEST_EVERY == 0

COUNT_TEMPLATES = (
    "How many {letter} are in {word}?",
    "How many {letter} are there in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the {letter} in {word}.",
    "Count how many times {letter} occurs in {word}.",
    "In the word {word}, how many {letter} are there?",
    "What is the number of {letter} in {word}?",
    "How many letter {letter} does {word} have?",
    "How often does {letter} show up in {word}?",
    "Tell me how many {letter} the word {word} contains.",
    "{word}: how many {letter}?",
    "Number of {letter} in {word}?",
)
SPELL_TEMPLATES = (
    "Spell the word: {word}",
    "Spell {word}.",
    "How do you spell {word}?",
    "Spell out {word} letter by letter.",
    "Can you spell the word {word}?",
    "Write {word} one letter at a time.",
)


@lru_cache(maxsize=4)
def load_words(path: str | Path = WORDS_PATH) -> tuple[str, ...]:
    """The word list: one lowercase a-z word per line."""
    words = tuple(line.strip() for line in open(path, encoding="utf-8") if line.strip())
    bad = [w for w in words if not (w.isascii() and w.isalpha() and w.islower())]
    if bad:
        raise ValueError(f"{path}: words must be lowercase a-z, got e.g. {bad[:5]}")
    return words


def split_words(words: tuple[str, ...], split: str) -> tuple[str, ...]:
    held_out = split == "test"
    return tuple(w for i, w in enumerate(words) if (i % TEST_EVERY == 0) == held_out)


def spelled(word: str) -> str:
    return f"{word}:{','.join(word)}"


class _GeneratedWords(Task):
    """Shared plumbing: a generated task over the split's words, `size` examples, fixed `seed`."""

    eval_type = "generative"

    def __init__(self, split: str = "train", *, size: int = 1000, seed: int = 0, words_path: str | Path = WORDS_PATH,
                 **view):
        self.size, self.seed = size, seed
        self.words = split_words(load_words(str(words_path)), split)
        super().__init__(split, **view)

    def examples(self, split: str) -> LazyExamples:
        return LazyExamples(self.size, self.make)

    def rng(self, index: int) -> random.Random:
        # a string seed is hashed with SHA-512: stable across runs and Python versions
        return random.Random(f"{self.name}/{self.split}/{self.seed}/{index}")

    def make(self, index: int) -> dict:
        raise NotImplementedError


class SpellingBee(_GeneratedWords):
    name = "spelling_bee"

    def make(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly a letter of the word, sometimes any letter, so "0" is a possible answer too
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        quote = rng.choice(("", "'", '"'))
        question = rng.choice(COUNT_TEMPLATES).format(letter=f"{quote}{letter}{quote}", word=word)
        # people skip the shift key and the final punctuation
        if rng.random() < 0.3:
            question = question.lower()
        if rng.random() < 0.4:
            question = question[:-1]
        return {"word": word, "letter": letter, "count": word.count(letter), "question": question}

    def to_conversation(self, ex: dict) -> Conversation:
        word, letter, count = ex["word"], ex["letter"], ex["count"]
        lines, running = [], 0
        for position, char in enumerate(word, 1):
            # "3:r" with no space: " r" and "r" are different tokens, and the spelling uses "r"
            if char == letter:
                running += 1
                lines.append(f"{position}:{char} yes, count={running}")
            else:
                lines.append(f"{position}:{char}")
        by_hand = (f"Let me spell '{word}' and count the letter '{letter}'.\n\n{spelled(word)}\n\n"
                   + "\n".join(lines) + f"\n\nBy hand I get {running}. Let me check with Python:\n\n")
        return {"messages": [
            {"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": [
                {"type": "text", "text": by_hand},
                {"type": "python", "text": f"'{word}'.count('{letter}')"},
                {"type": "python_output", "text": str(count)},
                {"type": "text", "text": f"\n\nPython also gives {count}.\n\n#### {count}"},
            ]},
        ]}

    def check(self, conversation: Conversation, answer: str) -> bool:
        return is_correct(conversation, answer)

    def reward(self, conversation: Conversation, completion: str) -> float:
        """1.0 when the completion's final number is exactly the letter count."""
        return float(is_correct(conversation, completion))


class SimpleSpelling(_GeneratedWords):
    name = "simple_spelling"

    def make(self, index: int) -> dict:
        rng = self.rng(index)
        word = rng.choice(self.words)
        return {"word": word, "question": rng.choice(SPELL_TEMPLATES).format(word=word)}

    def to_conversation(self, ex: dict) -> Conversation:
        return {"messages": [
            {"role": "user", "content": ex["question"]},
            {"role": "assistant", "content": spelled(ex["word"])},
        ]}

    def check(self, conversation: Conversation, answer: str) -> bool:
        return answer.strip() == text_of(last_assistant(conversation)["content"])

    def reward(self, conversation: Conversation, completion: str) -> float:
        return float(self.check(conversation, completion))
