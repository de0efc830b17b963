"""Categorical scoring (ARC, MMLU): only the logits of the choice letters, at the answer position, count."""

from __future__ import annotations

import pytest

from eval_support import RiggedModel, make_model, make_tokenizer
from llm.evaluate.categorical import LetterIds, evaluate_categorical, predict_letters
from llm.evaluate.results import MC_CHANCE
from llm.evaluate.sharding import Shard
from llm.tasks import build_task
from llm.tasks.base import Task
from llm.tasks.multiple_choice import MultipleChoiceTask, mc_conversation


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


class Questions(MultipleChoiceTask):
    """Multiple-choice questions given as (question, choices, answer index) tuples."""

    name = "questions"
    splits = ("test",)

    def __init__(self, rows, **view):
        self.rows = rows
        super().__init__("test", shuffle_seed=None, **view)

    def examples(self, split):
        return self.rows

    def to_conversation(self, row):
        question, choices, answer = row
        letters = "ABCD"[:len(choices)]
        return mc_conversation(question, list(letters), choices, letters[answer], options=list(choices))


QUESTIONS = [
    ("Capital of France?", ["Paris", "Rome", "Oslo", "Bern"], 0),
    ("Largest planet?", ["Mars", "Jupiter", "Venus", "Earth"], 1),
    ("2 + 2?", ["3", "5", "4", "22"], 2),
    ("Colour of the sky?", ["green", "red", "yellow", "blue"], 3),
    ("Opposite of hot?", ["cold", "warm", "wet", "dry"], 0),
    ("Author of Hamlet?", ["Dickens", "Austen", "Shakespeare"], 2),  # 3 choices, like some ARC rows
]


def prompt_index(tokenizer, task: Task) -> dict[tuple, dict]:
    """Conversation of each rendered prompt, so a rigged model can 'read' the question."""
    return {tuple(tokenizer.render_for_completion(c)): c for c in task}


def letter_model(tokenizer, task: Task, choose) -> RiggedModel:
    """A model whose answer to each question is the letter choose(conversation) returns."""
    prompts = prompt_index(tokenizer, task)
    return RiggedModel(tokenizer.vocab_size, lambda row: tokenizer.encode(choose(prompts[tuple(row)]))[0],
                       pad=tokenizer.bos_id)


def right_letter(conversation) -> str:
    return conversation["messages"][-1]["content"]


def test_model_preferring_the_right_letter_scores_100(tokenizer):
    task = Questions(QUESTIONS)
    result = evaluate_categorical(letter_model(tokenizer, task, right_letter), tokenizer, task, batch_size=4,
                                  progress=False)
    assert (result.correct, result.total) == (6, 6)
    assert result.accuracy == 1.0 and result.centered == 1.0 and result.chance == MC_CHANCE


def test_model_preferring_a_scores_the_share_of_a_answers(tokenizer):
    task = Questions(QUESTIONS)
    result = evaluate_categorical(letter_model(tokenizer, task, lambda c: "A"), tokenizer, task, batch_size=4,
                                  progress=False)
    assert (result.correct, result.total) == (2, 6)  # answers: A B C D A C


def test_permuting_choices_moves_the_scores(tokenizer):
    # a model that reads the question and knows its answer *text* follows it to any position;
    # one that always says "A" scores whatever share of right answers the permutation put at A
    def answer_to(rows):
        return {q: choices[a] for q, choices, a in rows}

    for shift in range(4):
        permuted = []
        for q, choices, a in QUESTIONS:
            order = [(i + shift) % len(choices) for i in range(len(choices))]
            permuted.append((q, [choices[i] for i in order], order.index(a)))
        task = Questions(permuted)
        knows = answer_to(QUESTIONS)
        reader = letter_model(tokenizer, task, lambda c: "ABCD"[c["options"].index(knows[c_question(c)])])
        always_a = letter_model(tokenizer, task, lambda c: "A")
        assert evaluate_categorical(reader, tokenizer, task, progress=False).correct == 6
        share_of_a = sum(a == 0 for _, _, a in permuted)
        assert evaluate_categorical(always_a, tokenizer, task, progress=False).correct == share_of_a
    # and the right answer moved to A for every question: the A-model becomes perfect
    to_a = [(q, [c[a]] + c[:a] + c[a + 1:], 0) for q, c, a in QUESTIONS]
    task = Questions(to_a)
    assert evaluate_categorical(letter_model(tokenizer, task, lambda c: "A"), tokenizer, task,
                                progress=False).correct == 6


def c_question(conversation) -> str:
    text = conversation["messages"][0]["content"]
    return text.split("Multiple Choice question: ", 1)[1].split("\n", 1)[0]


def test_only_the_choice_letters_compete(tokenizer):
    # the model's favourite token overall is "E" (not a choice letter of a 4-way question), its second is "C":
    # scoring over the letters only answers "C"
    task = Questions(QUESTIONS[:4])
    e, c = tokenizer.encode("E")[0], tokenizer.encode("C")[0]

    class SecondChoiceC(RiggedModel):
        def forward(self, idx, **kwargs):
            logits = super().forward(idx)
            logits[logits == 10.0] = 0.0
            for i, row in enumerate(idx.tolist()):
                n = max(j for j, t in enumerate(row) if t != self.pad) + 1
                logits[i, n - 1, e], logits[i, n - 1, c] = 20.0, 5.0
            return logits

    model = SecondChoiceC(tokenizer.vocab_size, lambda row: 0, pad=tokenizer.bos_id)
    assert predict_letters(model, tokenizer, list(task)) == ["C"] * 4


def test_batching_and_padding_do_not_change_answers(tokenizer):
    model = make_model(tokenizer)
    task = build_task("mmlu", "test", source="fixture")
    conversations = list(task)
    one_by_one = [predict_letters(model, tokenizer, [c])[0] for c in conversations]
    assert predict_letters(model, tokenizer, conversations) == one_by_one
    results = [evaluate_categorical(model, tokenizer, task, batch_size=b, progress=False) for b in (1, 4)]
    assert results[0] == results[1]
    shards = [evaluate_categorical(model, tokenizer, task, 2, Shard(r, 2), progress=False) for r in (0, 1)]
    assert sum(s.total for s in shards) == len(task) and sum(s.correct for s in shards) == results[0].correct


def test_letters_must_be_single_tokens(tokenizer):
    with pytest.raises(ValueError, match="'Zebra'.*single-token letters"):
        LetterIds(tokenizer)(["Zebra"])


def test_non_categorical_task_is_refused(tokenizer):
    with pytest.raises(ValueError, match="gsm8k.*not categorical"):
        evaluate_categorical(make_model(tokenizer), tokenizer, build_task("gsm8k", "test"), progress=False)
