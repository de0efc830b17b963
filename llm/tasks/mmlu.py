"""
MMLU (Hendrycks et al., 2021): 57 subjects of multiple choice, four options each.
https://huggingface.co/datasets/cais/mmlu

Row schema: {"question", "subject", "choices": [4 strings], "answer": 0-3}. The "auxiliary_train"
subset (~100K rows used for mid-training) wraps each row as {"train": {...}} on the hub; both the
wrapped and the flat form are accepted.
"""

from llm.conversation import Conversation
from llm.tasks.hub import DataFiles, load_rows
from llm.tasks.multiple_choice import MultipleChoiceTask, mc_conversation

LETTERS = ("A", "B", "C", "D")
COLUMNS = {"question": str, "subject": str, "choices": list, "answer": int}  # of "all" (auxiliary_train: either form)


class MMLU(MultipleChoiceTask):
    """subset "all" (splits validation | dev | test) or "auxiliary_train" (split train)."""

    splits = ("train", "validation", "dev", "test")

    def __init__(self, subset: str = "all", split: str = "test", *, data_files: DataFiles = None,
                 source: str = "hub", **view):
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        if (subset == "auxiliary_train") != (split == "train"):
            raise ValueError(
                f"MMLU split {split!r} does not go with subset {subset!r}: auxiliary_train has only 'train', "
                "'all' has validation | dev | test"
            )
        self.subset = subset
        self.name = "mmlu_aux" if subset == "auxiliary_train" else "mmlu"
        self.data_files, self.source = data_files, source
        super().__init__(split, **view)

    def examples(self, split: str):
        columns = COLUMNS if self.subset == "all" else None
        return load_rows(self.name, "cais/mmlu", self.subset, split, data_files=self.data_files, source=self.source,
                         columns=columns)

    def to_conversation(self, row: dict) -> Conversation:
        row = row.get("train") or row  # auxiliary_train's extra wrapper
        if len(row["choices"]) != len(LETTERS):
            raise ValueError(f"MMLU rows have 4 choices, got {len(row['choices'])}: {row['question'][:80]!r}")
        return mc_conversation(row["question"], LETTERS, row["choices"], LETTERS[row["answer"]],
                               subject=row["subject"])
