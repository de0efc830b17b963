"""Inside the sandbox: the harness (trusted) and, forked from it, the program (model-written code).

Entry: `harness.main([VERDICT_FD, UID?])`, from `python -I -S -B -c` (see isolation.py). The
harness forks the program's process before it has read a byte of its job, so that process never
holds the run's secret or its tests. The program's process closes the verdict descriptor and its
stdin, locks itself down (lockdown.py), reports which layers took effect, and runs the code as
__main__. With tests, it then serves calls to the entry point: the harness runs the tests in its
own interpreter, with a stand-in `candidate` that sends each call's arguments over a pipe and gets
the answer back by value (plain_values.py).

The verdict is the harness's alone: one line on VERDICT_FD, a descriptor the program's process
never holds, starting with the secret the parent sent on stdin. `passed` is written only after
`check(candidate)` returned; an exit, a crash or a malformed answer before that is a failure.
"""

import builtins
import marshal
import os
import select
import struct
import sys

import lockdown
import plain_values

_HERE = os.path.dirname(os.path.abspath(__file__))

_HEADER = struct.Struct("<I")
_MAX_ANSWER = 1 << 20  # bytes of one encoded answer; HumanEval's are a few hundred
_MAX_DETAIL = 2000
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4


class ProgramFailure(Exception):
    """The program, not the tests, made the run fail; the message says how."""


class ProgramEnded(ProgramFailure):
    """The program's process closed its answers: it ended, or will be ended."""


def main(argv: list[str]) -> None:
    verdict_fd = int(argv[0])
    if len(argv) > 1:
        _become(int(argv[1]))
    # After _become, which clears it: die with our parent (bwrap's init, or the evaluator itself
    # in the weaker mode); the program's process dies with us in turn.
    lockdown._libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    lockdown._libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace, no /proc/<pid>/mem of ours
    harness = os.getpid()
    requests, replies = os.pipe(), os.pipe()
    pid = os.fork()  # first, before the job (and its secret and tests) is read
    if pid == 0:
        _program(harness, verdict_fd, requests[0], replies[1])
        sys.exit(0)  # the program's process ends here, never in the harness's code below
    os.close(requests[0])
    os.close(replies[1])
    job = marshal.loads(_read_all(0))
    os.close(0)
    program_job = {k: job[k] for k in ("code", "entry_point", "readable", "writable", "site_dirs",
                                       "memory_mb", "cpu_s")}
    _send(requests[1], marshal.dumps(program_job))
    status, returncode, guards, detail = _supervise(job, _Child(pid), requests[1], replies[0])
    detail = (detail or "")[:_MAX_DETAIL]
    line = f"{job['secret']} {status} {returncode} {','.join(guards)}\n{detail}"
    os.write(verdict_fd, line.encode("utf-8", "replace"))
    os._exit(0)  # nothing left to flush or finalize: skip the interpreter's teardown


def _become(uid: int) -> None:
    """Root started the sandbox (no user namespace): become `uid`, which also drops every
    capability bwrap left us for this step."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid,) * 3 or os.getresgid() != (uid,) * 3:
        sys.exit(f"sandbox: could not switch to uid {uid}")


# ----------------------------------------------------------------------------- harness side


class _Child:
    """The program's process, as the harness waits for it (and reaps it once)."""

    def __init__(self, pid: int):
        self.pid, self.code = pid, None

    def end(self, grace: float | None) -> int:
        """Wait up to `grace` seconds (None: for ever) for it to end, then kill it; its exit code
        (negative: the signal that ended it)."""
        if self.code is None and grace is not None:
            try:
                pidfd = os.pidfd_open(self.pid)
                select.select([pidfd], [], [], grace)
                os.close(pidfd)
            except OSError:
                pass  # no pidfds on this kernel: what has not ended by now is killed
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.code = os.waitstatus_to_exitcode(status)
            else:
                os.kill(self.pid, 9)
        if self.code is None:
            self.code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.code


def _supervise(job: dict, child: _Child, requests: int, replies: int):
    """(status, returncode, guards, detail). Status: exited (no tests), passed, failed, ended."""
    try:
        ready = _answer(replies)
    except (ProgramFailure, ValueError):
        ready = None
    if not (type(ready) is tuple and len(ready) == 2 and ready[0] == "ready"
            and type(ready[1]) is tuple and all(type(g) is str and g.isprintable() for g in ready[1])):
        code = child.end(grace=1.0)
        return "ended", code, [], f"the program's process ended ({_status(code)}) before it ran"
    guards = [g.replace(",", "").replace(" ", "") for g in ready[1]]
    if job["entry_point"] is None:
        code = child.end(grace=None)  # the program runs to its end (or the parent's timeout)
        return "exited", code, guards, None
    try:
        _run_tests(job, _Candidate(child, requests, replies))
        status, returncode, detail = "passed", 0, None
    except Exception as e:
        status, returncode, detail = "failed", 1, _describe(e)
    os.close(requests)  # the program's serving loop sees EOF and ends
    child.end(grace=1.0)
    return status, returncode, guards, detail


def _run_tests(job: dict, candidate) -> None:
    namespace = {"__name__": "__tests__", "__builtins__": builtins}
    exec(compile(job["prelude"], "<prelude>", "exec"), namespace)  # the prompt's helpers
    exec(compile(job["tests"], "<tests>", "exec"), namespace)
    namespace[job["entry_point"]] = candidate  # some tests call the function by its name
    namespace["check"](candidate)


class _Candidate:
    """Stands in for the program's entry point: arguments go by value, answers come back as
    fresh plain values, exceptions as ProgramFailure."""

    def __init__(self, child: _Child, requests: int, replies: int):
        self.child, self.requests, self.replies = child, requests, replies

    def __call__(self, *args, **kwargs):
        try:
            _send(self.requests, marshal.dumps((args, kwargs)))
            answer = _answer(self.replies)
        except (BrokenPipeError, ProgramEnded):
            code = self.child.end(grace=1.0)
            raise ProgramFailure(f"the program ended ({_status(code)}) before its tests completed")
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "ok":
            return answer[1]
        if (type(answer) is tuple and len(answer) == 3 and answer[0] == "raise"
                and type(answer[1]) is str and type(answer[2]) is str):
            raise ProgramFailure(f"{answer[1]}: {answer[2]}" if answer[2] else answer[1])
        raise ProgramFailure(f"the program answered something that is not an answer: {answer!r:.200}")


def _answer(replies: int):
    frame = _receive(replies, _MAX_ANSWER)
    if frame is None:
        raise ProgramEnded("the program closed its answers")
    return plain_values.decode(frame)


def _describe(e: Exception) -> str:
    message = str(e)
    text = message if isinstance(e, ProgramFailure) else type(e).__name__ + (f": {message}" if message else "")
    tb, line = e.__traceback__, None
    while tb is not None:
        line = tb.tb_lineno if tb.tb_frame.f_code.co_filename == "<tests>" else line
        tb = tb.tb_next
    return text + (f" (tests, line {line})" if line else "")


def _status(code: int) -> str:
    return f"exit status {code}" if code >= 0 else f"signal {-code}"


# ----------------------------------------------------------------------------- program side


def _program(harness: int, verdict_fd: int, requests: int, replies: int) -> None:
    os.close(verdict_fd)  # first of all: the verdict is the harness's alone
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)  # the job, secret included, waits on the old stdin: not for this process
    keep = {0, 1, 2, requests, replies}
    for fd in range(3, max(keep)):
        if fd not in keep:
            _close_quietly(fd)
    os.closerange(max(keep) + 1, 1 << 20)
    job = marshal.loads(_receive(requests, None))
    guards = lockdown.apply(harness, job["readable"], job["writable"], job["memory_mb"],
                            job["cpu_s"])
    _send(replies, plain_values.encode(("ready", tuple(guards))))
    path = os.path.join(job["writable"], "program.py")
    try:  # a copy to read, so tracebacks can quote its lines; the code runs from memory
        with open(path, "w", encoding="utf-8") as f:
            f.write(job["code"])
    except OSError:
        pass
    code = compile(job["code"], path, "exec")
    # -S skipped site's .pth hooks (editable installs, certifi...), a large part of start-up;
    # installed packages stay importable.
    sys.path[:] = [p for p in sys.path if p != _HERE] + job["site_dirs"]
    sys.argv = [path]
    main_module = type(sys)("__main__")  # a fresh __main__, as `python program.py` would give
    main_module.__file__, main_module.__builtins__ = path, builtins
    sys.modules["__main__"] = main_module
    exec(code, main_module.__dict__)
    if job["entry_point"] is not None:
        _serve(main_module.__dict__.get(job["entry_point"]), job["entry_point"], requests, replies)
        sys.stdout.flush()  # the tests are over: keep the output, skip the teardown
        sys.stderr.flush()
        os._exit(0)


def _serve(function, name: str, requests: int, replies: int) -> None:
    while (frame := _receive(requests, None)) is not None:
        args, kwargs = marshal.loads(frame)
        try:
            if function is None:
                raise NameError(f"name {name!r} is not defined")
            reply = ("ok", function(*args, **kwargs))
        except Exception as e:
            reply = ("raise", type(e).__name__, _message(e))
        try:
            data = plain_values.encode(reply)
        except Exception as e:
            data = plain_values.encode(("raise", type(e).__name__, "the answer could not be sent"))
        _send(replies, data)


def _message(e: Exception) -> str:
    try:
        return str.__str__(str(e))[:_MAX_DETAIL]
    except Exception:
        return ""


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# ----------------------------------------------------------------------------- frames


def _send(fd: int, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        data = data[os.write(fd, data):]


def _receive(fd: int, limit: int | None) -> bytes | None:
    """One frame, or None at a clean end of the stream; ProgramFailure for a broken one."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if limit is not None and size > limit:
        raise ProgramFailure(f"the program sent an answer of {size} bytes (at most {limit})")
    payload = _read_exactly(fd, size)
    if payload is None:
        raise ProgramFailure("the program's answer broke off")
    return payload


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            if left == size:
                return None
            raise ProgramFailure("the program's answer broke off")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
