"""Categorical chat evaluation (ARC, MMLU): compare the logits of the choice letters only.

As nanochat's chat_eval: render the conversation up to <|assistant_start|>, run one forward pass,
and at that last position take the argmax over the token ids of the example's letters alone. No
sampling, so whole batches of questions go through at once; rows are right-padded with bos, which a
causal model never looks back at.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from llm.evaluate.results import MC_CHANCE, Accuracy, TaskResult
from llm.evaluate.sharding import Shard
from llm.tasks.base import Task
from llm.conversation import Conversation
from llm.tokenizer import Tokenizer


class LetterIds:
    """Token id of each choice letter, checked once: the scoring needs every letter to be one token."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self._ids = tokenizer, {}

    def __call__(self, letters: Sequence[str]) -> list[int]:
        for letter in letters:
            if letter not in self._ids:
                ids = self.tokenizer.encode(letter)
                if len(ids) != 1:
                    raise ValueError(f"choice letter {letter!r} is {len(ids)} tokens {ids} in this tokenizer; "
                                     f"categorical scoring needs single-token letters (train the tokenizer "
                                     f"on text that holds the letters)")
                self._ids[letter] = ids[0]
        return [self._ids[letter] for letter in letters]


def context_of(model: nn.Module) -> int:
    """How many tokens the model reads at most (prompts are cut from the left to fit)."""
    return int(model.config.sequence_len)


@torch.no_grad()
def predict_letters(model: nn.Module, tokenizer: Tokenizer, conversations: Sequence[Conversation],
                    letter_ids: LetterIds | None = None) -> list[str]:
    """The letter each conversation's assistant is most likely to answer with."""
    letter_ids = letter_ids or LetterIds(tokenizer)
    context = context_of(model)
    prompts = [tokenizer.render_for_completion(c)[-context:] for c in conversations]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.bos_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    device = next(model.parameters()).device
    logits = model(ids.to(device))
    predictions = []
    for i, (prompt, conversation) in enumerate(zip(prompts, conversations)):
        letters = conversation["letters"]
        focus = logits[i, len(prompt) - 1, letter_ids(letters)]
        predictions.append(letters[int(focus.argmax())])
    return predictions


def evaluate_categorical(model: nn.Module, tokenizer: Tokenizer, task: Task, batch_size: int = 8,
                         shard: Shard = Shard(), progress: bool = True) -> TaskResult:
    """Accuracy of the letter predictions on every example of `task` (this rank's share, summed over ranks)."""
    if task.eval_type != "categorical":
        raise ValueError(f"task {task.name!r} is {task.eval_type!r}, not categorical")
    metric, letter_ids = Accuracy().to(shard.device), LetterIds(tokenizer)
    for batch in shard.progress(shard.batches(len(task), batch_size), task.name, progress):
        conversations = [task[i] for i in batch]
        predictions = predict_letters(model, tokenizer, conversations, letter_ids)
        metric.update([task.score(c, p) for c, p in zip(conversations, predictions)])
    correct, total = metric.compute()
    return TaskResult(task.name, "categorical", correct, total, MC_CHANCE)
