"""
ARC (AI2 Reasoning Challenge), Easy and Challenge sets: grade-school science multiple choice.
https://huggingface.co/datasets/allenai/ai2_arc

Row schema: {"id", "question", "choices": {"text": [...], "label": [...]}, "answerKey"}. Labels are
usually A-E but a few rows use 1-4; as in nanochat, the row's own labels are its letters.
"""

from llm.conversation import Conversation
from llm.tasks.hub import DataFiles, load_rows
from llm.tasks.multiple_choice import MultipleChoiceTask, mc_conversation

SUBSETS = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
COLUMNS = {"id": str, "question": str, "choices": dict, "answerKey": str}


class ARC(MultipleChoiceTask):
    """subset: "ARC-Easy" or "ARC-Challenge"; split: train | validation | test."""

    splits = ("train", "validation", "test")

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", *, data_files: DataFiles = None,
                 source: str = "hub", **view):
        names = {v: k for k, v in SUBSETS.items()}
        if subset not in names:
            raise ValueError(f"ARC subset must be one of {sorted(names)}, got {subset!r}")
        self.subset, self.name = subset, names[subset]
        self.data_files, self.source = data_files, source
        super().__init__(split, **view)

    def examples(self, split: str):
        return load_rows(self.name, "allenai/ai2_arc", self.subset, split, data_files=self.data_files,
                         source=self.source, columns=COLUMNS)

    def to_conversation(self, row: dict) -> Conversation:
        choices = row["choices"]
        return mc_conversation(row["question"], choices["label"], choices["text"], row["answerKey"], id=row["id"])
