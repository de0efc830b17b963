"""Where the sandbox's interpreter runs: its own namespaces under bubblewrap, or none (weaker).

The namespaced view of the file system holds only what a Python interpreter needs, read-only: its
executable, its standard library and site-packages, the shared libraries it loads (/usr/lib, /lib
and the loader's cache), the harness at /harness; plus a fresh /dev (null, zero, urandom...) and one
writable directory, /tmp, a tmpfs of TMPFS_BYTES that vanishes with the sandbox. Everything else
of the host (/root, /home, /etc, /work, the project and its artifacts, the host's /tmp) is absent.
Landlock restricts reads to the same paths, so the weaker mode keeps that view where it can.
"""

from __future__ import annotations

import compileall
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from functools import cache

HARNESS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child")
TMPFS_BYTES = 64 << 20  # the writable /tmp: a flood of files ends at ENOSPC
NOBODY = 65534  # the sandbox's user, inside and (when root starts it) outside
_HARNESS_INSIDE = "/harness"
_LIBRARY_DIRS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32",
                 "/usr/libx32")
_PYTHON_FLAGS = ("-I", "-S", "-B", "-Xutf8")  # isolated, no site hooks, no .pyc writes


@dataclass(frozen=True)
class Isolation:
    command: tuple[str, ...]  # runs the harness; its arguments (verdict fd, uid) follow
    writable: str | None  # the program's directory as it sees it; None: a host temp dir per run
    readable: tuple[str, ...]  # what the program may read beneath (its Landlock rules)
    guards: tuple[str, ...]  # the layers this isolation adds, for ExecutionResult.guards
    drop_to: int | None  # the uid the harness becomes (root started it without a user namespace)


@cache
def namespaced(bwrap: str) -> Isolation:
    """The harness in new PID, network, IPC, UTS, cgroup and mount namespaces (bubblewrap), as
    an unprivileged user: with root, bwrap runs without a user namespace and the harness switches
    to `nobody` (so even host files it saw would be read as nobody); otherwise the caller's uid is
    mapped to `nobody` in a new user namespace, in which no further one may be made."""
    files, links = _python_view()
    args = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if os.geteuid() == 0:  # root's bwrap keeps every capability unless told; these serve _become()
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns"]
    for directory in _ancestors(files + [link for link, _ in links]):
        args += ["--perms", "0755", "--dir", directory]  # bwrap would copy /root's 0700
    for path in files:
        args += ["--ro-bind", path, path]
    for link, target in links:
        args += ["--symlink", target, link]
    args += ["--ro-bind", HARNESS_DIR, _HARNESS_INSIDE, "--dev", "/dev",
             "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp"]
    python = os.path.realpath(sys.executable)
    return Isolation(
        command=(*args, python, *_PYTHON_FLAGS, "-c", _bootstrap(_HARNESS_INSIDE)),
        writable="/tmp", readable=(*files, _HARNESS_INSIDE), guards=("namespaces",),
        drop_to=NOBODY if os.geteuid() == 0 else None)


@cache
def unisolated() -> Isolation:
    """The harness as a plain child of the evaluator (sandbox.allow_weaker=true without bwrap):
    the program keeps Landlock, seccomp, rlimits and a host temp dir, but shares the host's
    namespaces and user."""
    files, _ = _python_view()
    return Isolation(command=(sys.executable, *_PYTHON_FLAGS, "-c", _bootstrap(HARNESS_DIR)),
                     writable=None, readable=(*files, HARNESS_DIR), guards=(), drop_to=None)


def _bootstrap(harness_dir: str) -> str:
    """The harness's entry: imported (not run as a script), so its bytecode is read from
    __pycache__ instead of compiled on every run (half of the interpreter's start-up)."""
    compileall.compile_dir(HARNESS_DIR, quiet=2)  # where the package is read-only, pip did this
    return f"import sys; sys.path.insert(0, {harness_dir!r}); import harness; harness.main(sys.argv[1:])"


def _python_view() -> tuple[list[str], list[tuple[str, str]]]:
    """(paths to show read-only, (link, target) symlinks to recreate), outermost paths only."""
    paths = {os.path.realpath(sys.executable)}
    python_dirs = [sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    python_dirs += site.getsitepackages()
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        python_dirs.append(sysconfig.get_config_var("LIBDIR"))  # libpython itself
    paths |= {os.path.realpath(d) for d in python_dirs if d and os.path.isdir(d)}
    links = []
    for directory in _LIBRARY_DIRS:
        if os.path.islink(directory):
            links.append((directory, os.readlink(directory)))
        elif os.path.isdir(directory):
            paths.add(directory)
    if os.path.isfile("/etc/ld.so.cache"):  # where the loader finds libraries outside /usr/lib
        paths.add("/etc/ld.so.cache")
    outermost = sorted(p for p in paths if not any(_beneath(p, q) for q in paths))
    return outermost, links


def _beneath(path: str, other: str) -> bool:
    return path != other and path.startswith(other.rstrip("/") + "/")


def _ancestors(paths: list[str]) -> list[str]:
    found = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", ""):
            found.add(parent)
            parent = os.path.dirname(parent)
    return sorted(found - set(paths))
