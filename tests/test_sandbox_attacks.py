"""Hostile programs against the machine and the evaluator: each attempt is refused, and the
evaluator's next run is unharmed. Every program reports each attempt as `name refused ...` or
`name DONE`; the tests assert on those reports and on the host's own view of what happened."""

import os
import platform
import resource
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from llm.evaluate.sandbox import TestedProgram, run_program, run_tests

REPO = Path(__file__).resolve().parents[1]
SYS_CLONE, SYS_EXIT = {"x86_64": (56, 60), "aarch64": (220, 93)}[platform.machine()]
ATTEMPT = """\
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def attempt(name, action):
    try:
        result = action()
    except Exception as e:
        print(name, "refused", type(e).__name__, flush=True)
    else:
        failed = isinstance(result, int) and not isinstance(result, bool) and result < 0
        print(name, f"refused errno {ctypes.get_errno()}" if failed else "DONE", flush=True)
"""


def outcomes(result) -> dict[str, str]:
    """{attempt: 'refused ...' | 'DONE'} from a program built on ATTEMPT."""
    lines = [line.rsplit(" refused", 1) if " refused" in line else line.rsplit(" ", 1)
             for line in result.stdout.splitlines() if line.endswith("DONE") or " refused" in line]
    return {name: "DONE" if rest == "DONE" else "refused" + rest for name, rest in lines}


def assert_all_refused(result, expected: int):
    assert result.success, result
    found = outcomes(result)
    assert len(found) == expected and all(v.startswith("refused") for v in found.values()), found


def assert_next_run_succeeds():
    result = run_program("import os\nprint(sum(range(10)), sorted(os.listdir('/tmp')))")
    assert result.success and result.stdout == "45 ['program.py']\n", result  # a fresh /tmp
    tests = "def check(candidate):\n    assert candidate('abc') == 3\n"
    assert run_tests(TestedProgram(code="def f(s):\n    return len(s)\n", entry_point="f", tests=tests)).success


def live_tasks_named(name: str) -> list[str]:
    """pid/tid of every live thread on the host whose name (comm) is `name`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # ended while we looked
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
            if comm == name and state not in "ZX":
                found.append(f"{pid}/{tid}")
    return found


def assert_none_left(name: str):
    deadline = time.monotonic() + 10  # the kernel reaps a killed namespace asynchronously
    while live_tasks_named(name) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_tasks_named(name) == []


def without_bwrap(monkeypatch, tmp_path):
    """The weaker mode for real: a PATH without bwrap, and allow_weaker=True."""
    empty = tmp_path / "no-bwrap"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


# ---- the machine


def test_cannot_change_files_or_their_metadata_outside_its_tmp(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("original")
    visible = os.path.realpath(os.__file__)  # in the sandbox's read-only view, at the same path
    before = {p: os.stat(p) for p in (victim, visible)}
    code = ATTEMPT + f"""
for target in {[str(victim), visible, "/harness/harness.py", "/"]!r}:
    attempt("write " + target, lambda: open(target, "a").write("x"))
    attempt("chmod " + target, lambda: os.chmod(target, 0o777))
    attempt("utime " + target, lambda: os.utime(target, (0, 0)))
    attempt("chown " + target, lambda: os.chown(target, 0, 0))
    attempt("xattr " + target, lambda: os.setxattr(target, "user.x", b"1"))
    attempt("rename " + target, lambda: os.rename(target, "/tmp/moved"))
    attempt("hard link " + target, lambda: os.link(target, "/tmp/hard"))
    attempt("remove " + target, lambda: os.remove(target))
    attempt("libc chmod " + target, lambda: libc.chmod(target.encode(), 0o777))
    attempt("libc truncate " + target, lambda: libc.truncate(target.encode(), 0))
os.symlink({str(victim)!r}, "/tmp/link")
attempt("write through a symlink", lambda: open("/tmp/link", "w").write("x"))
"""
    assert_all_refused(run_program(code), expected=4 * 10 + 1)
    for path, stat in before.items():
        now = os.stat(path)
        assert (now.st_mode, now.st_uid, now.st_size, now.st_mtime_ns) == \
               (stat.st_mode, stat.st_uid, stat.st_size, stat.st_mtime_ns), path
    assert victim.read_text() == "original"
    assert_next_run_succeeds()


def test_host_secrets_are_out_of_sight(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    (tmp_path / "token").write_text(secret)
    targets = [str(tmp_path / "token"), str(tmp_path), "/etc/shadow", "/etc/passwd", "/root",
               "/root/.bashrc", "/home", "/work", str(REPO / "pyproject.toml"), str(REPO / "llm"),
               "/proc/1/environ", "/sys/kernel"]  # tmp_path is in the host's /tmp
    code = ATTEMPT + f"""
for target in {targets!r}:
    attempt("read " + target, lambda: print(open(target).read()) if not os.path.isdir(target)
            else print(os.listdir(target)))
"""
    result = run_program(code)
    assert_all_refused(result, expected=len(targets))
    assert secret not in result.stdout + result.stderr
    without_bwrap(monkeypatch, tmp_path)  # weaker: Landlock alone keeps reads to the view
    result = run_program(code.replace(f"for target in {targets!r}", f"for target in {targets[:3]!r}"),
                         allow_weaker=True)
    if any(g.startswith("landlock") for g in result.guards):
        assert_all_refused(result, expected=3)
        assert secret not in result.stdout + result.stderr
    monkeypatch.undo()
    assert_next_run_succeeds()


def test_cannot_reach_host_unix_sockets(tmp_path):
    path, abstract = str(tmp_path / "host.sock"), f"\0llm-test-{uuid.uuid4().hex}"
    listeners = []
    for address in (path, abstract):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen()
        listener.setblocking(False)
        listeners.append(listener)
    code = ATTEMPT + f"""
import socket
attempt("connect to a path", lambda: socket.socket(socket.AF_UNIX).connect({path!r}))
attempt("connect to an abstract name", lambda: socket.socket(socket.AF_UNIX).connect({abstract!r}))
"""
    result = run_program(code)
    assert_all_refused(result, expected=2)
    assert outcomes(result)["connect to an abstract name"].endswith("ConnectionRefusedError")  # another netns
    for listener in listeners:
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
        listener.close()
    assert_next_run_succeeds()


def test_no_network_through_sockets_or_io_uring():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = ATTEMPT + f"""
import socket
attempt("tcp connect", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=1))
attempt("udp socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
attempt("ipv6 socket", lambda: socket.socket(socket.AF_INET6))
attempt("netlink socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW))
attempt("packet socket", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW))
params = ctypes.create_string_buffer(120)  # struct io_uring_params
attempt("io_uring_setup", lambda: libc.syscall(ctypes.c_long(425), ctypes.c_long(8), params))
"""
    assert_all_refused(run_program(code), expected=6)
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()
    assert_next_run_succeeds()


def test_no_shell_or_new_process_through_any_libc_path():
    code = ATTEMPT + f"""
import subprocess
shell = ["/bin/sh", "-c", "echo pwned > /tmp/pwned"]
attempt("os.system", lambda: 0 if os.system(shell[2]) == 0 else -1)  # 127 << 8: no shell ran
attempt("libc system", lambda: 0 if libc.system(shell[2].encode()) == 0 else -1)
attempt("libc popen", lambda: libc.popen(shell[2].encode(), b"r") or -1)
attempt("posix_spawn", lambda: os.posix_spawn(shell[0], shell, {{}}))
attempt("subprocess", lambda: subprocess.run(shell))
attempt("execv", lambda: os.execv(shell[0], shell))
attempt("libc execve", lambda: libc.execve(b"/usr/bin/true", None, None))
attempt("os.fork", os.fork)
attempt("libc fork", libc.fork)
attempt("libc vfork", libc.vfork)
attempt("clone syscall", lambda: libc.syscall(ctypes.c_long({SYS_CLONE}), ctypes.c_long(17), 0, 0, 0, 0))
attempt("clone3 syscall", lambda: libc.syscall(ctypes.c_long(435), ctypes.create_string_buffer(88), 88))
print("pwned", os.path.exists("/tmp/pwned"))
"""
    result = run_program(code)
    assert_all_refused(result, expected=12)
    assert "pwned False" in result.stdout
    assert_next_run_succeeds()


def test_runs_unprivileged_in_its_own_pid_namespace():
    code = ATTEMPT + """
header, data = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()
libc.capget(header, data)
print("ids", os.getuid(), os.geteuid(), os.getgid(), os.getpid(), "caps", sum(data))
attempt("setuid 0", lambda: os.setuid(0))
attempt("see processes", lambda: os.listdir("/proc"))
"""
    result = run_program(code)
    assert_all_refused(result, expected=2)
    uid, euid, gid, pid, _, caps = result.stdout.split("ids ")[1].split()[:6]
    assert uid == euid != "0" and gid != "0" and caps == "0"
    assert int(pid) < 10  # bwrap's init is 1, the harness 2: no host process is numbered here
    if os.geteuid() == 0:
        assert uid == "65534"  # nobody outside too, not root mapped to another name
    assert_next_run_succeeds()


# ---- the evaluator


def test_cannot_signal_or_relimit_the_evaluator():
    me = os.getpid()
    limits, priority = resource.getrlimit(resource.RLIMIT_NOFILE), os.getpriority(os.PRIO_PROCESS, 0)
    affinity = os.sched_getaffinity(0)
    code = ATTEMPT + f"""
import resource, signal
attempt("kill the evaluator", lambda: os.kill({me}, signal.SIGKILL))
attempt("kill everything", lambda: os.kill(-1, signal.SIGKILL))
attempt("kill the evaluator's group", lambda: os.killpg({os.getpgid(me)}, signal.SIGKILL))
attempt("libc kill", lambda: libc.kill({me}, 9))
attempt("prlimit the evaluator", lambda: resource.prlimit({me}, resource.RLIMIT_NOFILE, (1, 1)))
attempt("prlimit init", lambda: resource.prlimit(1, resource.RLIMIT_AS, (1 << 20, 1 << 20)))
attempt("renice the evaluator", lambda: os.setpriority(os.PRIO_PROCESS, {me}, 19))
attempt("renice every process of the user", lambda: os.setpriority(os.PRIO_USER, 0, 19))
attempt("pin the evaluator", lambda: os.sched_setaffinity({me}, {{0}}))
attempt("ptrace attach", lambda: libc.ptrace(16, {me}, 0, 0))
attempt("pidfd of the evaluator", lambda: os.pidfd_open({me}))
attempt("read its memory", lambda: libc.process_vm_readv({me}, 0, 0, 0, 0, 0))
"""
    assert_all_refused(run_program(code), expected=12)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == limits
    assert os.getpriority(os.PRIO_PROCESS, 0) == priority and os.sched_getaffinity(0) == affinity
    assert_next_run_succeeds()


def test_output_is_capped_but_the_program_runs_on():
    result = run_program("print('x' * 1_000_000)\nprint('done', flush=True)", max_output_bytes=1000)
    assert result.success
    assert result.stdout.startswith("x" * 1000) and result.stdout.count("x") == 1000
    assert result.stdout.endswith("[... 999006 more bytes dropped]")
    assert_next_run_succeeds()


def test_endless_output_is_capped_and_timed_out():
    result = run_program("while True:\n    print('y' * 1000)", timeout_s=1, max_output_bytes=500)
    assert result.timed_out and not result.success
    kept, marker = result.stdout.split("\n[... ")
    assert kept == "y" * 500 and marker.endswith(" more bytes dropped]")
    assert_next_run_succeeds()


def test_a_flood_of_files_ends_in_a_full_tmpfs_that_vanishes(tmp_path, monkeypatch):
    tag = uuid.uuid4().hex[:8]
    code = f"""
import errno, os, time
megabytes, error = 0, None
try:
    for i in range(1000):
        with open(f"/tmp/{tag}-{{i}}", "wb") as f:
            for _ in range(16):
                f.write(b"x" * (1 << 20))
                megabytes += 1
except OSError as e:
    error = errno.errorcode[e.errno]
count, end = 0, time.monotonic() + 0.3
while time.monotonic() < end:
    open(f"/tmp/empty-{{count}}", "w").close()
    count += 1
print(megabytes, error, count)
"""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the evaluator makes no temp dir of its own
    result = run_program(code, timeout_s=10)
    megabytes, error, count = result.stdout.split()
    assert result.success and error == "ENOSPC" and int(megabytes) <= 64 and int(count) > 0
    assert not os.path.exists(f"/tmp/{tag}-0") and os.listdir(tmp_path) == []
    assert_next_run_succeeds()


def test_no_process_outlives_the_sandbox():
    name = f"llm-{uuid.uuid4().hex[:11]}"  # a thread name (comm) holds 15 characters
    linger = ATTEMPT + f"""
import threading, time
def linger():
    libc.prctl(15, {name.encode()!r}, 0, 0, 0)  # PR_SET_NAME: the host can find this thread
    time.sleep(1000)
threading.Thread(target=linger).start()
attempt("fork", os.fork)
attempt("clone", lambda: libc.syscall(ctypes.c_long({SYS_CLONE}), ctypes.c_long(17), 0, 0, 0, 0))
time.sleep(0.2)
"""
    # The main thread ends but the lingering thread keeps the process alive past the deadline.
    result = run_program(linger + f"libc.syscall(ctypes.c_long({SYS_EXIT}), 0)\n", timeout_s=1)
    assert result.timed_out and outcomes(result) == {"fork": "refused PermissionError",
                                                     "clone": "refused errno 1"}
    assert_none_left(name)
    # A correct answer that leaves the thread behind passes; the thread dies with the sandbox.
    code = linger + "def f(s):\n    return len(s)\n"
    assert run_tests(TestedProgram(code=code, entry_point="f", tests="def check(c):\n    assert c('ab') == 2\n")).success
    assert_none_left(name)
    assert_next_run_succeeds()


def test_cleanup_follows_no_symlink(tmp_path, monkeypatch):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("precious")
    code = f"""
import os
os.symlink({str(keep)!r}, "link-to-dir")
os.symlink({str(keep / "file")!r}, "link-to-file")
os.mkdir("locked")
os.symlink({str(keep)!r}, "locked/inner")
os.chmod("locked", 0)
print(sorted(os.listdir(".")))
"""
    assert run_program(code).success  # the links lead nowhere inside; /tmp vanishes with it
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    without_bwrap(monkeypatch, tmp_path)  # weaker: a host temp dir, which cleanup removes
    result = run_program(code, allow_weaker=True)
    assert result.success and "link-to-dir" in result.stdout
    assert (keep / "file").read_text() == "precious" and os.listdir(temp) == []
    monkeypatch.undo()
    assert_next_run_succeeds()


def test_sleeping_forever_is_killed_at_the_timeout():
    name = f"llm-{uuid.uuid4().hex[:11]}"
    code = f"import ctypes, time\nctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)\ntime.sleep(10**6)"
    result = run_program(code, timeout_s=1)
    assert result.timed_out and not result.success and result.returncode == -9
    assert "timed out" in result.error
    assert_none_left(name)
    assert_next_run_succeeds()


@pytest.mark.parametrize("code", [
    "bytearray(10**10)",
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))",
])
def test_allocating_10_gb_fails_with_memory_exceeded(code):
    result = run_program(code, memory_mb=256)
    assert not result.success and result.memory_exceeded and not result.timed_out
    assert "memory limit of 256 MB" in result.error
    assert_next_run_succeeds()


def test_fork_loop_fails_at_once():
    result = run_program("import os\nwhile True:\n    os.fork()", timeout_s=5)
    assert not result.success and not result.timed_out and "PermissionError" in result.error
    assert_next_run_succeeds()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("LLM_TEST_SECRET", "hunter2")
    result = run_program("import os\nprint(sorted(os.environ))")
    assert result.success and "LLM_TEST_SECRET" not in result.stdout
