"""Chat tasks: conversation schema, task views and mixtures, data loading, conversions and scoring."""

import gzip
import json
import re
from collections import Counter

import pytest

from llm.tasks import HubUnavailableError, TaskMixture, build_mixture, build_task, extract_answer, numbers_equal
from llm.tasks.arc import ARC
from llm.tasks.arithmetic import Arithmetic
from llm.conversation import prompt_of, text_of, validate_conversation
from llm.tasks.customjson import CustomJSON
from llm.tasks.gsm8k import GSM8K, VENDORED_DIR, answer_to_parts, parts_to_answer
from llm.tasks.hub import FIXTURES_DIR, fixture_path, load_rows
from llm.tasks.humaneval import HumanEval, extract_program
from llm.tasks.identity import Identity
from llm.tasks.mmlu import MMLU
from llm.tasks.registry import TASKS
from llm.tasks.spelling import SimpleSpelling, SpellingBee

HUB_TASKS = {  # name -> a split it has
    "smoltalk": "train", "mmlu": "test", "mmlu_aux": "train", "arc_easy": "test", "arc_challenge": "validation",
    "gsm8k": "train",
}


def tool_conversation():
    return {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "2+3 = "}, {"type": "python", "text": "2+3"},
            {"type": "python_output", "text": "5"}, {"type": "text", "text": "5\n#### 5"},
        ]},
        {"role": "user", "content": "Thanks"},
    ]}


# ---- conversation schema -------------------------------------------------------------------------

def test_valid_conversations_pass_and_are_returned():
    conv = tool_conversation()
    assert validate_conversation(conv) is conv
    validate_conversation({"messages": [{"role": "user", "content": "hi"}]})  # a prompt
    validate_conversation({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                           "letters": ["A"]})  # metadata is allowed


@pytest.mark.parametrize("messages, pattern", [
    ([], "non-empty"),
    ([{"role": "system", "content": "x"}], "only a system message"),
    ([{"role": "robot", "content": "x"}], "'robot'"),
    ([{"role": "assistant", "content": "x"}], "'assistant' but 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": 3}], r"message 0 \(user\) content must be str"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}]}], r"\(user\) content must be str"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": []}], "empty list of parts"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "code", "text": "x"}]}],
     "part 0 has type 'code'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "python"}]}],
     r"part 0 \(python\) needs a str 'text'"),
    (["hello"], "message 0 must be a dict"),
])
def test_invalid_conversations_name_the_problem(messages, pattern):
    with pytest.raises(ValueError, match=pattern):
        validate_conversation({"messages": messages})


def test_not_a_conversation():
    with pytest.raises(ValueError, match="'messages'"):
        validate_conversation([{"role": "user", "content": "hi"}])


def test_text_of_and_prompt_of():
    conv = tool_conversation()
    conv["messages"] = conv["messages"][:3]
    assert text_of(conv["messages"][2]["content"]) == "2+3 = 5\n#### 5"
    prompt = prompt_of(conv)
    assert [m["role"] for m in prompt["messages"]] == ["system", "user"]
    assert len(conv["messages"]) == 3  # the original is untouched
    with pytest.raises(ValueError, match="ends with 'user'"):
        prompt_of(prompt)


# ---- task views ----------------------------------------------------------------------------------

def test_slicing_matches_indexing():
    task = Arithmetic("train", size=100)
    rows = [task[i] for i in range(100)]
    assert [c for c in task[10:20]] == rows[10:20]
    assert [c for c in task[5:50:7]] == rows[5:50:7]
    assert len(task[90:200]) == 10  # stop past the end is clipped
    assert task[-1] == rows[-1]
    view = Arithmetic("train", size=100, start=5, stop=50, step=7)
    assert list(view) == rows[5:50:7]
    with pytest.raises(IndexError, match="out of range"):
        task[100]


@pytest.mark.parametrize("view, pattern", [
    ({"start": -1}, "start must be >= 0"), ({"start": 5, "stop": 2}, "stop must be"), ({"step": 0}, "step must be"),
])
def test_bad_views_are_refused(view, pattern):
    with pytest.raises(ValueError, match=pattern):
        Arithmetic("train", size=10, **view)


def test_bad_split_lists_valid_splits():
    with pytest.raises(ValueError, match=r"no split 'validation'.*\('train', 'test'\)"):
        GSM8K("validation")


def test_shuffle_is_fixed_by_seed():
    first = [c["messages"][0]["content"] for c in GSM8K("train", stop=20)]
    again = [c["messages"][0]["content"] for c in GSM8K("train", stop=20)]
    other = [c["messages"][0]["content"] for c in GSM8K("train", shuffle_seed=1, stop=20)]
    assert first == again and first != other
    unshuffled = GSM8K("train", shuffle_seed=None)
    assert unshuffled[0]["messages"][0]["content"].startswith("Natalia sold clips")
    task = Arithmetic("train", size=50)
    a, b = task.shuffled(3), task.shuffled(3)
    assert list(a) == list(b) and list(a) != list(task)
    key = lambda c: c["messages"][0]["content"]  # noqa: E731
    assert sorted(map(key, a)) == sorted(map(key, task))  # same rows, other order


# ---- mixtures ------------------------------------------------------------------------------------

def test_weighted_mixture_honours_proportions():
    arith, bee = Arithmetic("train", size=500), SpellingBee("train", size=300)
    mix = TaskMixture([arith, bee], weights=[3, 1], size=4000, seed=0)
    assert len(mix) == 4000 and mix.counts == [3000, 1000]
    names = [mix[i]["task"] for i in range(2000)]
    share = names.count("arithmetic") / len(names)
    assert abs(share - 0.75) < 0.03, share
    # the smaller share still cycles evenly through its task's rows
    locals_of_bee = Counter(mix.example(i)[1] for i in range(len(mix)) if mix.example(i)[0] == 1)
    assert set(locals_of_bee) == set(range(300)) and max(locals_of_bee.values()) - min(locals_of_bee.values()) <= 1
    # a row is the task's own conversation
    t, k = mix.example(7)
    assert mix[7] == [arith, bee][t][k]


def test_mixture_order_is_fixed_by_seed():
    tasks = [Arithmetic("train", size=200), SimpleSpelling("train", size=200)]
    order = lambda mix: [mix.example(i) for i in range(len(mix))]  # noqa: E731
    assert order(TaskMixture(tasks, seed=1)) == order(TaskMixture(tasks, seed=1))
    assert order(TaskMixture(tasks, seed=1)) != order(TaskMixture(tasks, seed=2))


def test_unweighted_mixture_uses_every_row_once_and_listing_twice_oversamples():
    a, b = Arithmetic("train", size=30), SimpleSpelling("train", size=10)
    mix = TaskMixture([a, b])
    assert len(mix) == 40
    assert sorted(mix.example(i) for i in range(40)) == [(0, k) for k in range(30)] + [(1, k) for k in range(10)]
    twice = TaskMixture([a, b, b])
    assert Counter(c["task"] for c in twice) == {"arithmetic": 30, "simple_spelling": 20}
    assert len(mix[5:15]) == 10 and list(mix[5:15]) == [mix[i] for i in range(5, 15)]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"weights": [1]}, "1 weights for 2 tasks"), ({"weights": [1, -1]}, "weights must be >= 0"),
    ({"size": 10}, "size is only used with weights"),
])
def test_bad_mixtures_are_refused(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TaskMixture([Arithmetic("train", size=5), SimpleSpelling("train", size=5)], **kwargs)


def test_empty_task_in_mixture_is_refused():
    with pytest.raises(ValueError, match="'arithmetic' in the mixture is empty"):
        TaskMixture([Arithmetic("train", size=5, start=5)])


def test_build_mixture_from_specs():
    mix = build_mixture([{"name": "arithmetic", "size": 50, "weight": 1},
                         {"name": "spelling_bee", "size": 50, "weight": 1, "split": "test"}], size=100, seed=0)
    assert mix.counts == [50, 50] and {c["task"] for c in mix} == {"arithmetic", "spelling_bee"}
    assert mix.tasks[1].split == "test"
    with pytest.raises(ValueError, match="every task of the mixture or to none"):
        build_mixture([{"name": "arithmetic", "weight": 2}, "simple_spelling"])


# ---- registry ------------------------------------------------------------------------------------

def test_registry_names_and_unknown_name():
    assert set(HUB_TASKS) | {"identity", "spelling_bee", "simple_spelling", "arithmetic", "humaneval"} <= set(TASKS)
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; valid names: \[.*'gsm8k'"):
        build_task("gsm9k")


@pytest.mark.parametrize("name", sorted(set(TASKS) - {"custom_json"}))
def test_every_task_yields_valid_conversations(name):
    kwargs = {"source": "fixture"} if name in HUB_TASKS and name != "gsm8k" else {}
    split = HUB_TASKS.get(name, "test" if name == "humaneval" else "train")
    task = build_task(name, split, **kwargs)
    assert len(task) > 0
    for conv in list(task[:5]):
        validate_conversation(conv)
        assert conv["task"] == name
        json.dumps(conv)  # JSON-friendly: it goes over HTTP too


def test_train_only_tasks_cannot_score_or_reward():
    task = build_task("identity")
    with pytest.raises(NotImplementedError, match="train-only"):
        task.score(task[0], "hello")
    with pytest.raises(NotImplementedError, match="no reward"):
        task.reward(task[0], "hello")


# ---- hub tasks from local files ------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(HUB_TASKS))
def test_fixtures_load_through_local_files(name, tmp_path):
    split = HUB_TASKS[name]
    by_path = build_task(name, split, data_files=str(fixture_path(name)))
    rows = [json.loads(line) for line in open(fixture_path(name))]
    assert len(by_path) == len(rows)
    # the same rows from parquet, the hub's own file format
    import pandas as pd

    parquet = tmp_path / f"{split}.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    by_parquet = build_task(name, split, data_files={split: [str(parquet)]}, shuffle_seed=None)
    assert list(by_parquet) == list(build_task(name, split, source="fixture", shuffle_seed=None))


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        build_task("smoltalk", "train", data_files=str(tmp_path / "nope.parquet"))
    with pytest.raises(ValueError, match="no entry for split 'train'"):
        build_task("smoltalk", "train", data_files={"test": str(fixture_path("smoltalk"))})
    odd = tmp_path / "rows.xml"
    odd.write_text("<rows/>")
    with pytest.raises(ValueError, match="cannot tell the format"):
        build_task("smoltalk", "train", data_files=str(odd))
    with pytest.raises(ValueError, match="no fixture for task 'arithmetic'"):
        fixture_path("arithmetic")


@pytest.fixture
def hub_offline(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_unreachable_hub_names_the_local_file_option(hub_offline):
    with pytest.raises(HubUnavailableError) as err:
        load_rows("smoltalk", "nonexistent-org/no-such-dataset", None, "train")
    message = str(err.value)
    assert "no-such-dataset" in message and "data_files=" in message and "source='fixture'" in message
    with pytest.raises(HubUnavailableError, match=r"build_task\('arc_easy', 'test', data_files="):
        ARC("ARC-Easy", "test")


# ---- GSM8K ---------------------------------------------------------------------------------------

def test_gsm8k_vendored_splits_are_the_real_data():
    assert len(GSM8K("train")) == 7473 and len(GSM8K("test")) == 1319
    assert (VENDORED_DIR / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2021 OpenAI")


def test_gsm8k_tool_call_conversion_round_trips_on_real_examples():
    with gzip.open(VENDORED_DIR / "train.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(200)]
    task = GSM8K("train", shuffle_seed=None, stop=200)
    for i, row in enumerate(rows):
        parts = task[i]["messages"][1]["content"]
        assert parts_to_answer(parts) == row["answer"]
        spans = re.findall(r"<<([^>]+)=([^>=]*)>>", row["answer"])
        calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert calls == spans
        assert all(q["type"] == "python_output" for p, q in zip(parts, parts[1:]) if p["type"] == "python")
        assert parts[-1]["type"] == "text" and "#### " in parts[-1]["text"]


def test_gsm8k_conversion_of_a_known_answer():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nSo 48+24 = <<48+24=72>>72 in all.\n#### 72"
    assert answer_to_parts(answer) == [
        {"type": "text", "text": "Natalia sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips in May.\nSo 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 in all.\n#### 72"},
    ]


@pytest.mark.parametrize("text, expected", [
    ("He earns $1,080 in total.\n#### 1,080", "1080"),      # real reference form
    ("... = <<1000000-150000=850000>>850,000 per year.\n#### 850,000", "850000"),
    ("#### 72", "72"),
    ("#### -3", "-3"),
    ("#### $18.50", "18.50"),
    ("#### 7\nActually it is 8", "7"),                       # the marked answer wins
    ("So she has 12 + 7 = 19 apples left.", "19"),          # model style: last number
    ("The total is 1,234.", "1234"),
    ("She pays $2.50 each, so $10.", "10"),
    ("The answer is 3.75", "3.75"),
    ("I don't know", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_numbers_compare_numerically():
    assert numbers_equal("72.0", "72") and numbers_equal("1080", "1080.00")
    assert not numbers_equal("72", "73") and not numbers_equal(None, "1") and not numbers_equal("x", "x")


def test_gsm8k_score_and_reward():
    task = GSM8K("test", stop=3)
    conv = task[0]
    reference = extract_answer(text_of(conv["messages"][-1]["content"]))
    wrong = str(int(float(reference)) + 1)
    assert task.score(conv, f"Let me think... #### {reference}") is True
    assert task.score(conv, f"so the answer is {reference}.") is True
    assert task.score(conv, f"#### {wrong}") is False and task.score(conv, "no idea") is False
    assert task.reward(conv, f"#### {reference}") == 1.0 and task.reward(conv, f"#### {wrong}") == 0.0
    assert task.score(task.example(0), f"#### {reference}") is True  # a raw example works too


# ---- multiple choice -----------------------------------------------------------------------------

def test_mmlu_rendering_and_scoring():
    task = MMLU("all", "test", source="fixture", shuffle_seed=None)
    conv = task[1]  # the anatomy question, answer index 1
    user = conv["messages"][0]["content"]
    assert user.startswith("Multiple Choice question: Which of the following is the body cavity")
    assert "\n- Abdominal=A\n- Cranial=B\n- Pleural=C\n- Spinal=D\n" in user
    assert user.endswith("\n\nRespond only with the letter of the correct answer.")
    assert conv["messages"][1]["content"] == "B" and conv["letters"] == ["A", "B", "C", "D"]
    assert conv["subject"] == "anatomy"
    assert task.score(conv, "B") and task.score(conv, " B\n") and not task.score(conv, "A")
    with pytest.raises(ValueError, match=r"'E' is not one of the choice letters \['A', 'B', 'C', 'D'\]"):
        task.score(conv, "E")


def test_mmlu_auxiliary_train_unwraps_and_pairs_subset_with_split():
    aux = MMLU("auxiliary_train", "train", source="fixture", shuffle_seed=None)
    assert aux.name == "mmlu_aux" and aux[0]["messages"][1]["content"] == "B"
    with pytest.raises(ValueError, match="auxiliary_train has only 'train'"):
        MMLU("auxiliary_train", "test")


def test_arc_uses_the_rows_own_labels():
    easy = ARC("ARC-Easy", "test", source="fixture", shuffle_seed=None)
    numeric = easy[2]
    assert numeric["letters"] == ["1", "2", "3", "4"] and numeric["messages"][1]["content"] == "4"
    assert "- an iron nail=4\n" in numeric["messages"][0]["content"]
    assert easy.score(numeric, "4") and not easy.score(numeric, "1")
    three = easy[4]
    assert three["letters"] == ["A", "B", "C"]
    challenge = ARC("ARC-Challenge", "test", source="fixture", shuffle_seed=None)
    assert challenge.name == "arc_challenge" and challenge[3]["letters"] == ["A", "B", "C", "D", "E"]
    assert challenge.eval_type == "categorical"


# ---- generated tasks -----------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Arithmetic, SpellingBee, SimpleSpelling])
def test_generated_tasks_are_deterministic(cls):
    a, b = cls("train", size=50), cls("train", size=50)
    assert list(a) == list(b)
    assert list(cls("train", size=50, seed=1)) != list(a)
    assert list(cls("test", size=50)) != list(a)
    assert cls("train", size=50, shuffle_seed=None)[7] == cls("train", size=10, shuffle_seed=None)[7]


def test_arithmetic_problems_are_correct_and_small():
    task = Arithmetic("train", size=300, difficulty=1)
    for conv in task:
        parts = conv["messages"][1]["content"]
        call, output = parts[1]["text"], parts[2]["text"]
        assert str(eval(call)) == output  # the tool call computes the forced output
        assert parts[-1]["text"].endswith(f"#### {output}") and int(output) >= 0
        assert all(int(n) <= 20 for n in re.findall(r"\d+", call))
    hard = Arithmetic("train", size=300, difficulty=3)
    expressions = [hard.example(i)["expression"] for i in range(300)]
    assert {e.count(" ") for e in expressions} == {2, 4}  # one- and two-operation problems at level 3
    assert any("*" in e for e in expressions)
    with pytest.raises(ValueError, match="difficulty must be one of"):
        Arithmetic(difficulty=9)


def test_arithmetic_reward():
    task = Arithmetic("test", size=5)
    conv = task[0]
    value = task.example(0)["answer"]
    assert task.reward(conv, f"{task.example(0)['expression']} = {value}\n#### {value}") == 1.0
    assert task.reward(conv, f"#### {value + 1}") == 0.0
    assert task.reward(conv, "") == 0.0


def test_spelling_bee_counts_and_reward():
    task = SpellingBee("train", size=200)
    for i in range(len(task)):
        ex, conv = task.example(i), task[i]
        assert ex["count"] == ex["word"].count(ex["letter"])
        parts = conv["messages"][1]["content"]
        assert parts[1] == {"type": "python", "text": f"'{ex['word']}'.count('{ex['letter']}')"}
        assert parts[2]["text"] == str(ex["count"]) and parts[3]["text"].endswith(f"#### {ex['count']}")
    conv, count = task[0], task.example(0)["count"]
    assert task.reward(conv, f"#### {count}") == 1.0 and task.reward(conv, f"#### {count + 1}") == 0.0
    assert task.score(conv, f"There are {count}") is True


def test_spelling_test_words_are_held_out():
    train = {SpellingBee("train", size=2000).example(i)["word"] for i in range(2000)}
    test = {SpellingBee("test", size=500).example(i)["word"] for i in range(500)}
    assert train and test and not train & test


def test_simple_spelling():
    task = SimpleSpelling("test", size=20)
    conv, word = task[0], task.example(0)["word"]
    assert conv["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert task.reward(conv, f" {word}:{','.join(word)}\n") == 1.0 and task.reward(conv, word) == 0.0


# ---- identity and custom JSONL -------------------------------------------------------------------

def test_identity_fills_name_and_maker():
    default = Identity(shuffle_seed=None)
    assert 50 <= len(default) <= 100
    text = json.dumps(list(default))
    assert "{name}" not in text and "{maker}" not in text and "nanochat-lightning project" in text
    custom = Identity(name="Pico", maker="Acme Labs", shuffle_seed=None)
    assert custom[0]["messages"][1]["content"].startswith("Hi! I'm Pico, a small language model made by Acme Labs.")
    with pytest.raises(ValueError, match=r"no split 'test'"):
        Identity("test")


def test_custom_json_reads_lists_and_dicts_and_reports_bad_lines(tmp_path):
    path = tmp_path / "chats.jsonl"
    as_list = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    as_dict = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    path.write_text(json.dumps(as_list) + "\n\n" + json.dumps(as_dict) + "\n")
    task = build_task("custom_json", path=path, shuffle_seed=None)
    assert [c["messages"][1]["content"] for c in task] == ["hello", "4"]
    path.write_text(path.read_text() + json.dumps([{"role": "assistant", "content": "oops"}]) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:4: message 0 has role 'assistant'"):
        CustomJSON(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        CustomJSON(tmp_path / "missing.jsonl")


# ---- HumanEval -----------------------------------------------------------------------------------

def test_humaneval_problems_and_program():
    task = HumanEval(shuffle_seed=None)
    assert len(task) == 164
    conv = task[0]
    assert conv["task_id"] == "HumanEval/0" and conv["entry_point"] == "has_close_elements"
    assert conv["messages"][0]["content"] == conv["prompt"]
    assert conv["messages"][1]["content"] == conv["prompt"] + conv["canonical_solution"]
    full = conv["prompt"] + conv["canonical_solution"]
    for completion in (f"Here you go:\n```python\n{full}```\nDone.", full, conv["canonical_solution"]):
        program = task.program(conv, completion)
        assert program.code.count("def has_close_elements(") == 1
        assert program.code.startswith("from typing import List") and "check(" not in program.code
        assert (program.entry_point, program.tests, program.prelude) == ("has_close_elements", conv["test"], conv["prompt"])
    with pytest.raises(NotImplementedError, match="execution sandbox"):
        task.score(conv, full)


@pytest.mark.parametrize("completion, code", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1"),
    ("Sure!\n```\nx = 2\n```\nand\n```python\ny = 3\n```", "x = 2"),
    ("def g():\n    pass\n", "def g():\n    pass"),
])
def test_extract_program(completion, code):
    assert extract_program(completion) == code


def test_fixtures_directory_has_one_file_per_hub_task():
    assert {p.stem for p in FIXTURES_DIR.glob("*.jsonl")} == set(HUB_TASKS)


def test_data_files_may_come_from_a_hydra_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"data_files": {"train": [str(fixture_path("smoltalk"))]}})
    assert len(build_task("smoltalk", "train", data_files=cfg.data_files)) == 6
