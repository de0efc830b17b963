"""Damaged data files (data=files text sources, chat task files): one line naming the file, the row and the
fix, up front where the first rows show it and while reading (in DataLoader workers too) where they do not."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm.data.loading import batch_loader
from llm.data.pretrain import PackedTokenStream
from llm.data.sources import TextSource, iter_texts
from llm.errors import BadFileError
from llm.tasks import build_task
from llm.tasks.customjson import CustomJSON
from llm.tasks.identity import Identity


def jsonl(rows: list) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def parquet(table: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table), sink)
    return sink.getvalue().to_pybytes()


DOCS = [{"text": f"document {i}"} for i in range(40)]

# (name, file name, content, what the message says) -- damage the first rows show
UP_FRONT = [
    ("empty", "docs.jsonl", b"", "is empty"),
    ("not JSON", "docs.jsonl", b"<html>not json</html>\n", "line 1 is not JSON"),
    ("not an object", "docs.jsonl", jsonl([DOCS[0], ["a", "list"]]), "line 2 is a JSON list, not an object"),
    ("text not a string", "docs.jsonl", jsonl([DOCS[0], DOCS[1], {"text": 5}]), "line 3: 'text' is 5 (int), not text"),
    ("no text field", "docs.jsonl", jsonl([DOCS[0], {"body": "x"}]), "line 2 has no 'text' field"),
    ("parquet that is text", "docs.parquet", b"text,not,parquet\n", "is not a whole parquet file"),
    ("parquet cut short", "docs.parquet", parquet({"text": ["a", "b"]})[:-30], "is not a whole parquet file"),
    ("parquet text of numbers", "docs.parquet", parquet({"text": [1, 2]}), "column 'text' holds int64, not text"),
    ("parquet null text", "docs.parquet", parquet({"text": ["a", None]}), "row 2 has no 'text' (null)"),
    ("txt not UTF-8", "docs.txt", b"caf\xe9 au lait\n", "is not UTF-8 text"),
    ("gz that is not gzip", "docs.jsonl.gz", jsonl(DOCS[:2]), "cannot be read (BadGzipFile"),
]


@pytest.mark.parametrize("name,filename,content,what", UP_FRONT, ids=[c[0] for c in UP_FRONT])
def test_text_source_checks_each_file_up_front(name, filename, content, what, tmp_path):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(BadFileError) as caught:
        TextSource(kind="files", files=[str(tmp_path / "*")])
    message = str(caught.value)
    assert message.startswith(f"{path}: {what}") and "\n" not in message, message
    assert "; fix: repair or remove that row, or leave the file out of data.source.files" in message


# damage past the rows checked up front: the source is made, reading fails at the row
LATER = [
    ("line 41 not JSON", "docs.jsonl", jsonl([*DOCS, '{"text": "cut sho']), "line 41 is not JSON"),
    ("line 41 text a number", "docs.jsonl", jsonl([*DOCS, {"text": 41}]), "line 41: 'text' is 41 (int), not text"),
    ("line 41 text null", "docs.jsonl", jsonl([*DOCS, {"text": None}]), "line 41: 'text' is null, not text"),
    ("gz cut short", "docs.jsonl.gz", gzip.compress(jsonl([{"text": os.urandom(500).hex()} for _ in range(100)]))[:20000],
     "cannot be read (EOFError"),
]


@pytest.mark.parametrize("name,filename,content,what", LATER, ids=[c[0] for c in LATER])
def test_reading_names_the_damaged_row(name, filename, content, what, tmp_path):
    (tmp_path / "a_good.jsonl").write_bytes(jsonl(DOCS[:3]))
    path = tmp_path / filename
    path.write_bytes(content)
    source = TextSource(kind="files", files=[str(tmp_path / "a_good.jsonl"), str(path)])
    texts = iter_texts(source)
    assert [next(texts) for _ in range(3)] == ["document 0", "document 1", "document 2"]  # the good file
    with pytest.raises(BadFileError) as caught:
        list(texts)
    message = str(caught.value)
    assert message.startswith(f"{path}: {what}") and "\n" not in message, message
    assert "fix: repair or remove that row" in message


def test_a_dataloader_worker_reports_the_row_in_one_line(tmp_path, tokenizer_dir):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(jsonl([*DOCS, {"text": ["not", "text"]}]))
    source = TextSource(kind="files", files=[str(path)])
    stream = PackedTokenStream(source, str(tokenizer_dir), batch_size=2, seq_len=512, first_doc=0, last_doc=None,
                               rank=0, world_size=1)
    with pytest.raises(BadFileError) as caught:
        next(iter(batch_loader(stream, num_workers=1)))  # the row is read in the worker process
    assert str(caught.value) == (f"{path}: line 41: 'text' is [\"not\", \"text\"] (list), not text; fix: repair or "
                                 f"remove that row, or leave the file out of data.source.files (data.source.text_field "
                                 f"names the field that holds the text)")


# ----------------------------------------------------------------------------- chat task files

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

CONVERSATION_FILES = [
    ("empty", b"", "holds no conversations"),
    ("line 2 not JSON", jsonl([CHAT, "[{role: user}]"]), ":2: not JSON"),
    ("line 1 not a conversation", jsonl([[{"role": "user", "content": 7}]]), ":1: message 0"),
    ("not UTF-8", b"\xff\xfe[]\n", "is not UTF-8 text"),
]


@pytest.mark.parametrize("task", ["custom_json", "identity"])
@pytest.mark.parametrize("name,content,what", CONVERSATION_FILES, ids=[c[0] for c in CONVERSATION_FILES])
def test_conversation_files_name_the_line_and_the_fix(task, name, content, what, tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_bytes(content)
    with pytest.raises(BadFileError) as caught:
        CustomJSON(path) if task == "custom_json" else Identity(path=path)
    message = str(caught.value)
    assert message.startswith(str(path)) and what in message and "\n" not in message, message
    assert "; fix: " in message


GSM8K = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(30)]
SMOLTALK = [{"messages": CHAT, "source": "x"}] * 30

# (task, split, file name, content, what the message says)
TASK_FILES = [
    ("gsm8k", "train", "train.jsonl", b"", "is empty"),
    ("gsm8k", "train", "train.jsonl", jsonl([*GSM8K, "not json at all"]), "line 31 is not JSON"),
    ("gsm8k", "train", "train.jsonl", jsonl([*GSM8K, {"question": 31, "answer": "#### 32"}]),
     "row 31: 'question' is '31' (int), not str"),
    ("gsm8k", "train", "train.jsonl", jsonl([*GSM8K, {"question": "q", "answer": None}]), "row 31 has no 'answer'"),
    ("gsm8k", "train", "train.jsonl", jsonl([{"question": "q"}]), "has no column 'answer'"),
    ("smoltalk", "train", "train.parquet", b"messages\n", "is not a whole parquet file"),
    ("smoltalk", "train", "train.jsonl", jsonl([*SMOLTALK, {"messages": "hi", "source": "x"}]),
     "row 31: 'messages' is 'hi' (str), not list"),
    ("arc_easy", "test", "test.jsonl", jsonl([{"id": "1", "question": "q", "choices": "ABCD", "answerKey": "A"}]),
     "row 1: 'choices' is 'ABCD' (str), not dict"),
    ("mmlu", "test", "test.csv", b"question,answer\n\xff\n", "is not UTF-8 text"),
]


@pytest.mark.parametrize("task,split,filename,content,what", TASK_FILES, ids=[f"{c[0]}:{c[4]}" for c in TASK_FILES])
def test_task_data_files_name_the_file_row_and_fix(task, split, filename, content, what, tmp_path):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(BadFileError) as caught:
        build_task(task, split, data_files=str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: {what}") and "\n" not in message, message
    assert message.endswith("; fix: repair or remove that row, or point data_files= at other files")


def test_intact_task_files_load(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(GSM8K))
    assert len(build_task("gsm8k", "train", data_files=str(path))) == 30
