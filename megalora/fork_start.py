"""Starting a module's ``main`` in a forked child of this process, instead of a new interpreter.

A new interpreter for each rank imports torch, megatron-core and torch's
dynamo (which the first ``torch.optim`` optimizer pulls in) again: ~6 s of CPU
per rank, paid N times over on the same cores. The CLI's parent process has
torch imported already; it imports the rest once (:func:`preload`) and its
ranks are forks of it, started by torchrun's agent with ``start_method="fork"``
(:func:`run_module` is their entry point). ``megalora verify``'s world-size-1
run is a fork too (:func:`start`).

Only on Linux without CUDA (:func:`can_fork`): a CUDA context does not survive a fork,
and whether one exists in a parent is not something to reason about; with GPUs
each rank is a fresh ``python -u -m MODULE`` as before.
"""

from __future__ import annotations

import gc
import importlib
import io
import os
import signal
import sys
import traceback
from typing import Callable, Optional, Sequence

# What every rank imports whatever it runs; the verb's own module comes on top.
_PRELOAD = ("megatron.core", "megatron.core.models.gpt", "torch._dynamo", "megalora.training")


def can_fork() -> bool:
    """Whether ranks can be forks of this process: Linux and no CUDA device.

    Not macOS, where a fork after system frameworks were loaded can crash the
    child (why Python's multiprocessing spawns there by default).
    """
    import torch

    return sys.platform.startswith("linux") and not torch.cuda.is_available()


def preload(module: str) -> None:
    """Imports what the ranks running ``module`` import, once, in this process."""
    for name in (*_PRELOAD, module):
        importlib.import_module(name)
    # Modules live as long as the process: keep the cyclic collector off them, in the ranks too (else each
    # collection walks torch's and megatron's objects and, after the fork, copies their memory pages).
    gc.freeze()


def run_module(module: str, args: Sequence[str]) -> None:
    """``python -u -m module args`` in a forked child: ``module.main(args)``; a non-zero status exits with it.

    Put back what the child must not inherit: the signal handlers of torchrun's
    agent (which would turn the agent's SIGTERM into an exception a rank stuck
    in a collective never sees), buffered output, and the thread count, which
    the OpenMP runtime read from the environment when the parent loaded it.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd, name in ((1, "stdout"), (2, "stderr")):  # -u: every write reaches the file at once
        stream = getattr(sys, name)
        raw = io.FileIO(fd, "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(raw, encoding=getattr(stream, "encoding", None) or "utf-8",
                                            errors=getattr(stream, "errors", None) or "strict",
                                            write_through=True))
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    mod = importlib.import_module(module)
    sys.argv = [getattr(mod, "__file__", module), *args]
    code = _status(lambda: mod.main(list(args)))
    if code:
        _exit(code)


def _status(body: Callable[[], Optional[int]]) -> int:
    """The exit status an interpreter running ``body()`` would give, with what it would print.

    Its return value; a ``SystemExit``'s code (a message is printed to stderr
    and gives 1); 1 with the traceback printed for any other exception, here
    instead of multiprocessing's ``Process ForkProcess-1:`` report.
    """
    try:
        return body() or 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - the child must reach os._exit whatever happens
        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


class Forked:
    """A child started by :func:`fork`: ``wait``, ``poll`` and ``kill`` like ``subprocess.Popen``."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            os.kill(self.pid, signal.SIGKILL)


def fork(body: Callable[[], Optional[int]], env: dict, stdout: Optional[int] = None,
         stderr: Optional[int] = None) -> Forked:
    """Forks a child that runs ``body()`` with environment ``env`` and exits with its return value.

    Args:
        stdout: A file descriptor for the child's standard output, or None to share this process's.
        stderr: The same for its standard error.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.clear()
            os.environ.update(env)
            for fd, target in ((1, stdout), (2, stderr)):
                if target is not None:
                    os.dup2(target, fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            code = _status(body)
        finally:
            _exit(code)
    return Forked(pid)


def start(module: str, args: Sequence[str], env: dict, output: Optional[int] = None) -> Forked:
    """Forks a child running ``module.main(args)`` (:func:`run_module`) with environment ``env``.

    Args:
        output: A file descriptor for the child's standard output and error, or None to share this process's.
    """
    return fork(lambda: run_module(module, args), env, stdout=output, stderr=output)
