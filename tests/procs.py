"""Finding and ending the processes a test session started (Linux ``/proc``; no psutil needed).

The suite starts processes three ways: the multi-rank pools (workers forked
by multiprocessing's fork server, and its ``resource_tracker``), ``torchrun`` through the
CLI, and plain subprocesses. :func:`become_subreaper` makes the test session
the parent of any of them that loses its own parent, so that
:func:`descendants` still sees it at the end of the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
# multiprocessing's tracker exits by itself once every process holding its pipe
# (this one and the spawned workers) has exited; ending it early is harmless
# but pointless, and it is not a leak while this process lives.
TRACKER = "multiprocessing.resource_tracker"
# The pools' fork server likewise exits once this process has (its pipe from here closes).
FORKSERVER = "multiprocessing.forkserver"


def mp_helper(pid: int) -> bool:
    """Whether ``pid`` is multiprocessing's tracker or fork server (not a leak while this process lives)."""
    line = cmdline(pid)
    return TRACKER in line or FORKSERVER in line


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it instead of to init."""
    with contextlib.suppress(Exception):
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return False


def _stat(pid: int) -> tuple[int, str]:
    """``(parent pid, state letter)`` of ``pid``."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
    return int(fields[1]), fields[0]


def parent(pid: int) -> int:
    """The parent pid of ``pid``; 0 when it is gone."""
    with contextlib.suppress(OSError, ValueError):
        return _stat(pid)[0]
    return 0


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return ""


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def descendants(root: int = 0) -> list[int]:
    """Every live (not zombie) process below ``root`` (default: this process)."""
    root = root or os.getpid()
    parents: dict[int, int] = {}
    for pid in _pids():
        with contextlib.suppress(OSError, ValueError):
            ppid, state = _stat(pid)
            if state != "Z":
                parents[pid] = ppid
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier}
        found.extend(sorted(frontier))
    return found


def tagged(name: str, value: str) -> list[int]:
    """Live processes whose environment holds ``name=value`` (inherited by every descendant)."""
    needle = f"{name}={value}".encode()
    found = []
    for pid in _pids():
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/environ", "rb") as handle:
                env = handle.read().split(b"\0")
            if needle in env and _stat(pid)[1] != "Z":
                found.append(pid)
    return found


def reap_zombies() -> None:
    """Collects the exit status of this process's exited children (orphans a subreaper inherited)."""
    for pid in _pids():
        with contextlib.suppress(OSError, ValueError):
            ppid, state = _stat(pid)
            if ppid == os.getpid() and state == "Z":
                os.waitpid(pid, os.WNOHANG)


def end(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` for those still alive."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                alive.append(pid)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            reap_zombies()
            alive = [p for p in alive if os.path.exists(f"/proc/{p}") and _alive(p)]
            time.sleep(0.1)
        pids = alive
    reap_zombies()


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return _stat(pid)[1] != "Z"
    return False


def gloo_threads() -> int:
    """Socket threads of live gloo process groups in this process (one per group; 0 off Linux)."""
    if not os.path.isdir("/proc/self/task"):
        return 0
    count = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm") as handle:
            count += handle.read().strip() == "gloo_tcp_loop"
    return count
