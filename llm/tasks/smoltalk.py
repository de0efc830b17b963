"""
SmolTalk (the "smol" version for models under 1B parameters): general multi-turn chat.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk  (train 460K rows, test 24K)

Row schema: {"messages": [{"role", "content"}], "source"}; an optional system message comes first.
Train-only in the sense of scoring: it has no right answer, so eval_type is None.
"""

from llm.tasks.base import Task
from llm.conversation import Conversation, validate_conversation
from llm.tasks.hub import DataFiles, load_rows


COLUMNS = {"messages": list}


class SmolTalk(Task):
    name = "smoltalk"

    def __init__(self, split: str = "train", *, data_files: DataFiles = None, source: str = "hub", **view):
        self.data_files, self.source = data_files, source
        super().__init__(split, **view)

    def examples(self, split: str):
        return load_rows(self.name, "HuggingFaceTB/smol-smoltalk", None, split, data_files=self.data_files,
                         source=self.source, columns=COLUMNS)

    def to_conversation(self, row: dict) -> Conversation:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        return validate_conversation({"messages": messages})
