"""The locks the program's process puts on itself before its first line of model code runs.

Landlock (file access beneath the allowed paths only, no TCP, no abstract unix sockets or signals
outside the sandbox), a seccomp deny-list, no capabilities and rlimits. `apply` returns the names of
the layers that took effect; the harness reports them as `ExecutionResult.guards`.
"""

import ctypes
import os
import resource
import stat
import struct

_MAX_FILE_MB = 16  # RLIMIT_FSIZE: a runaway writer gets EFBIG (Python ignores SIGXFSZ)
_MAX_OPEN_FILES = 64
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 38, 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
_libc.syscall.restype = ctypes.c_long


def apply(parent: int, readable: list[str], writable: str, memory_mb: int, cpu_s: int) -> list[str]:
    """Lock this process down. `readable`: paths it may read beneath; `writable`: its one directory."""
    _libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)  # SIGKILL when the harness dies
    if os.getppid() != parent:
        os._exit(70)  # the harness died before prctl took effect
    guards = []
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:  # required by Landlock and seccomp
        abi = _landlock(readable, writable)
        guards += [f"landlock-abi{abi}"] if abi else []
        guards += ["seccomp"] if _seccomp() else []
    guards += ["no-capabilities"] if _drop_capabilities() else []
    limits = {resource.RLIMIT_AS: memory_mb << 20, resource.RLIMIT_CPU: cpu_s,
              resource.RLIMIT_FSIZE: _MAX_FILE_MB << 20, resource.RLIMIT_NOFILE: _MAX_OPEN_FILES,
              resource.RLIMIT_CORE: 0}
    if "seccomp" not in guards:
        # Fallback fork-bomb stop. NPROC counts every process and thread of the real user (so it
        # also forbids threads here) and never applies to root; seccomp is precise, hence first.
        limits[resource.RLIMIT_NPROC] = 1
    for which, value in limits.items():  # CPU: the soft limit sends SIGXCPU, the hard one SIGKILL
        resource.setrlimit(which, (value, value + 1 if which == resource.RLIMIT_CPU else value))
    return guards + ["rlimits"]


def _syscall(nr: int, *args) -> int:  # every argument as a 64-bit long: syscall() is variadic
    return _libc.syscall(ctypes.c_long(nr), *[a if isinstance(a, bytes) else ctypes.c_long(a)
                                              for a in args])


def _landlock(readable: list[str], writable: str) -> int:
    """Reads only beneath `readable`, writes only beneath `writable` (and /dev/null); no TCP bind
    or connect (ABI 4); no abstract unix sockets or signals beyond this process (ABI 6).
    Returns the ABI version in force, or 0."""
    create, add_rule, restrict = 444, 445, 446  # the same numbers on every architecture
    abi = _syscall(create, 0, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return 0
    file_read, file_write, execute, truncate = 1 << 2, 1 << 1, 1 << 0, (1 << 14 if abi >= 3 else 0)
    read = execute | file_read | 1 << 3  # + READ_DIR
    every = read | sum(1 << b for b in range(1, 13)) | (1 << 13 if abi >= 2 else 0) | truncate
    attr = struct.pack("Q", every)
    if abi >= 4:
        attr += struct.pack("Q", 0b11)  # handled and never allowed: TCP bind and connect
    if abi >= 6:
        attr += struct.pack("Q", 0b11)  # scoped: abstract unix sockets, signals
    ruleset = _syscall(create, attr, len(attr), 0)
    if ruleset < 0:
        return 0
    rules = [(path, read) for path in readable] + [(writable, every)]
    rules += [("/dev/null", file_read | file_write | truncate), ("/dev/urandom", file_read)]
    try:
        for path, allowed in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this machine: nothing to allow
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                allowed &= execute | file_read | file_write | truncate  # the rights a file can have
            rule = struct.pack("=Qi", allowed, fd)  # struct landlock_path_beneath_attr (packed)
            ok = _syscall(add_rule, ruleset, 1, rule, 0) == 0  # LANDLOCK_RULE_PATH_BENEATH
            os.close(fd)
            if not ok:
                return 0
        return abi if _syscall(restrict, ruleset, 0) == 0 else 0
    finally:
        os.close(ruleset)


# Numbers per architecture (AUDIT_ARCH, {name: nr}); from the kernel's unistd headers.
_X86_64 = dict(
    fork=57, vfork=58, clone=56, clone3=435, execve=59, execveat=322, kill=62, tkill=200,
    tgkill=234, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, ptrace=101, socket=41, socketpair=53,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, process_vm_readv=310,
    process_vm_writev=311, process_madvise=440, process_mrelease=448, kcmp=312, prlimit64=302,
    setpriority=141, sched_setaffinity=203, sched_setscheduler=144, sched_setparam=142,
    sched_setattr=314, ioprio_set=251, migrate_pages=256, move_pages=279, get_robust_list=274,
    perf_event_open=298, bpf=321, userfaultfd=323, keyctl=250, add_key=248, request_key=249,
    mount=165, umount2=166, pivot_root=155, chroot=161, unshare=272, setns=308, mount_setattr=442,
    move_mount=429, open_tree=428, open_tree_attr=467, fsopen=430, fsconfig=431, fsmount=432,
    fspick=433, personality=135, kexec_load=246, kexec_file_load=320, init_module=175,
    finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163,
    quotactl=179, quotactl_fd=443, syslog=103, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, name_to_handle_at=303, open_by_handle_at=304, fanotify_init=300,
    memfd_create=319, memfd_secret=447, seccomp=317, settimeofday=164, clock_settime=227,
    clock_adjtime=305, adjtimex=159, sethostname=170, setdomainname=171, vhangup=153,
    lookup_dcookie=212, iopl=172, ioperm=173, modify_ldt=154, uselib=134)
_AARCH64 = dict(
    clone=220, clone3=435, execve=221, execveat=281, kill=129, tkill=130, tgkill=131,
    rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, ptrace=117, socket=198, socketpair=199,
    pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, process_vm_readv=270,
    process_vm_writev=271, process_madvise=440, process_mrelease=448, kcmp=272, prlimit64=261,
    setpriority=140, sched_setaffinity=122, sched_setscheduler=119, sched_setparam=118,
    sched_setattr=274, ioprio_set=30, migrate_pages=238, move_pages=239, get_robust_list=100,
    perf_event_open=241, bpf=280, userfaultfd=282, keyctl=219, add_key=217, request_key=218,
    mount=40, umount2=39, pivot_root=41, chroot=51, unshare=97, setns=268, mount_setattr=442,
    move_mount=429, open_tree=428, open_tree_attr=467, fsopen=430, fsconfig=431, fsmount=432,
    fspick=433, personality=92, kexec_load=104, kexec_file_load=294, init_module=105,
    finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225, acct=89,
    quotactl=60, quotactl_fd=443, syslog=116, io_uring_setup=425, io_uring_enter=426,
    io_uring_register=427, name_to_handle_at=264, open_by_handle_at=265, fanotify_init=262,
    memfd_create=279, memfd_secret=447, seccomp=277, settimeofday=170, clock_settime=112,
    clock_adjtime=266, adjtimex=171, sethostname=161, setdomainname=162, vhangup=58,
    lookup_dcookie=18)
_SYSCALLS = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}

# Refused outright. Process creation and exec (a shell through any libc path needs one of them);
# reaching other processes (signals, ptrace, their memory, fds, limits, scheduling, NUMA
# placement, robust futex lists, kcmp); io_uring (it does I/O, sockets included, that the socket
# rules below never see); kernel attack surface an evaluator never needs (bpf, perf, userfaultfd,
# keyrings, modules, kexec, ioports, personality); namespaces and mounts (a new user namespace
# would hand back capabilities); file handles (open_by_handle_at walks around the mount view);
# memfds (RAM that neither RLIMIT_AS nor the size of the temp dir counts); and the clock, host
# name, swap, quotas, accounting and reboot.
_DENIED = (
    "fork", "vfork", "execve", "execveat", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
    "ptrace", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "process_vm_readv",
    "process_vm_writev", "process_madvise", "process_mrelease", "kcmp", "ioprio_set",
    "migrate_pages", "move_pages", "get_robust_list", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "perf_event_open", "bpf", "userfaultfd", "keyctl", "add_key",
    "request_key", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "mount_setattr", "move_mount", "open_tree", "open_tree_attr", "fsopen", "fsconfig", "fsmount",
    "fspick", "personality", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog",
    "name_to_handle_at", "open_by_handle_at", "fanotify_init", "memfd_create", "memfd_secret",
    "seccomp", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname",
    "setdomainname", "vhangup", "lookup_dcookie", "iopl", "ioperm", "modify_ldt", "uselib")
_CLONE_THREAD = 0x00010000
_CLONE_NAMESPACES = 0x7E020000  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
_ALLOW, _KILL_PROCESS, _EPERM, _ENOSYS = 0x7FFF0000, 0x80000000, 0x00050001, 0x00050026
_LD, _JEQ, _JSET, _JGE, _RET = 0x20, 0x15, 0x45, 0x35, 0x06


def _only_when(nr: int, conditions: list[tuple[int, tuple[int, ...]]]) -> list[tuple]:
    """Syscall `nr` is allowed when every (argument, values) condition holds, else EPERM: the
    argument's low 32 bits (what the kernel reads of a pid or an int flag) is one of the values."""
    body = []
    for arg, values in conditions:
        body.append((_LD, 0, 0, 16 + 8 * arg))
        for i, value in enumerate(values):  # match: jump past the rest of this test
            body.append((_JEQ, len(values) - i, 0, value))
        body.append((_RET, 0, 0, _EPERM))
    body.append((_RET, 0, 0, _ALLOW))
    return [(_JEQ, 0, len(body), nr)] + body  # not this syscall: skip the block, A still holds nr


def _filter(pid: int) -> list[tuple] | None:
    if os.uname().machine not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[os.uname().machine]
    prog = [(_LD, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL_PROCESS), (_LD, 0, 0, 0),
            (_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _KILL_PROCESS)]  # x32 ABI numbers: refuse
    # clone: threads only (CLONE_THREAD set, no namespace flag); clone3 cannot be inspected
    # (its flags sit in memory), so ENOSYS makes libc fall back to clone.
    prog += [(_JEQ, 0, 5, nr["clone"]), (_LD, 0, 0, 16), (_JSET, 2, 0, _CLONE_NAMESPACES),
             (_JSET, 0, 1, _CLONE_THREAD), (_RET, 0, 0, _ALLOW), (_RET, 0, 0, _EPERM)]
    prog += [(_JEQ, 0, 1, nr["clone3"]), (_RET, 0, 0, _ENOSYS)]
    self_only = (0, pid)  # 0 means the caller in each of these
    prog += _only_when(nr["kill"], [(0, (pid,))]) + _only_when(nr["tgkill"], [(0, (pid,))])
    prog += _only_when(nr["prlimit64"], [(0, self_only)])
    for name in ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr"):
        prog += _only_when(nr[name], [(0, self_only)])
    prog += _only_when(nr["setpriority"], [(0, (0,)), (1, self_only)])  # PRIO_PROCESS, itself
    prog += _only_when(nr["socket"], [(0, (1,))]) + _only_when(nr["socketpair"], [(0, (1,))])
    for name in _DENIED:  # AF_UNIX only, above: the network namespace leaves nothing to reach
        if name in nr:
            prog += [(_JEQ, 0, 1, nr[name]), (_RET, 0, 0, _EPERM)]
    return prog + [(_RET, 0, 0, _ALLOW)]


def _seccomp() -> bool:
    prog = _filter(os.getpid())
    if prog is None:
        return False

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    return _libc.prctl(_PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0) == 0  # MODE_FILTER


def _drop_capabilities() -> bool:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all empty
    return _libc.capset(header, data) == 0
