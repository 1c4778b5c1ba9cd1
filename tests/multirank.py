"""Runs a test body on N gloo ranks on CPU, in a persistent pool of workers.

Starting a rank costs seconds (torch and megatron imports, the gloo rendezvous), so the N worker processes
are started once per world size, as forks of one server process that imported those once
(:mod:`tests.pool_preload`), and reused by every test. Each task is a module-level function, sent by its
qualified name, that every rank calls with the same arguments; the per-rank return values come back as a
list indexed by rank.

Failure handling, so one bad test never poisons the next:

* An exception on any rank fails the call with every failing rank's full traceback.
* Ranks that do not answer by the deadline are presumed stuck in a collective; the pool is killed, the call
  fails naming them, and the next call spawns a fresh pool. Once one rank has failed, the others get only a
  short grace period, since they are most likely waiting on the failed rank.
* After every task a worker puts back the state it started with (:mod:`tests.worker_state`): Megatron's
  parallel state, megalora's module globals, the CPU patches, the RNGs, the environment. So each test
  starts from a bare world group and calls ``init_parallel`` itself, whatever ran before it on the same
  workers.

Example::

    def _body(x):
        import torch.distributed as dist
        return dist.get_rank() + x

    def test_ranks():
        assert run_on_ranks(2, _body, 10) == [10, 11]
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import io
import os
import pickle
import sys
import time
import traceback
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Any, Callable

from tests import procs

__all__ = ["run_on_ranks", "shutdown_pools", "MultiRankError"]

# How long to wait for the remaining ranks once one rank has raised: long
# enough for ranks failing the same assertion independently, short enough
# that ranks stuck waiting on the failed one are not waited on for long.
_GRACE_AFTER_FAILURE_S = 5.0
_STARTUP_TIMEOUT_S = 180.0
_RETIRE_AT_GLOO_THREADS = 8  # a worker's own world group has one
_WORKER_ENV = {
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
    # Megatron warns on every TP layer unless this is set; it means nothing on CPU.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # CPU-only by design, also with GPUs: the CPU compatibility layer is what every multi-rank test exercises.
    "CUDA_VISIBLE_DEVICES": "",
}


class MultiRankError(AssertionError):
    """A task failed or timed out on some ranks."""


# --------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    # The fork server exits once every holder of its "alive" pipe has; each child it forks inherits one (to
    # start children through it in turn), which would keep it, and so the workers below, alive after the
    # test process is killed. Workers start nothing through it.
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    # A worker stuck in a collective never reads its pipe, so it would not notice a parent
    # killed by SIGKILL; the kernel kills it when its parent, the fork server, exits (as it
    # does once the test process that started it is gone: the pipe from that one closes).
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # A parent that died before that sends no signal, and the orphan would
    # wait for its peers forever; an orphan has a new parent by now.
    parent = os.getppid()
    if parent != parent_pid and procs.FORKSERVER not in procs.cmdline(parent):
        os._exit(1)


def _worker_main(rank: int, world_size: int, host: str, port: int, conn, parent_pid: int,
                 environ: dict) -> None:
    _die_with_parent(parent_pid)
    # Forked from the fork server, which holds the environment of the moment it started.
    os.environ.clear()
    os.environ.update(environ)

    def reply(*msg) -> None:
        # Plain pickle: tensors travel by value, not as shared-memory handles
        # that would tie the parent to this worker's lifetime.
        conn.send_bytes(pickle.dumps(msg))

    try:
        import warnings

        # Printed once per worker start by every megatron import on CPU: noise.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore(host, port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=_STARTUP_TIMEOUT_S))
        # The pool's own timeout ends stuck collectives long before gloo's does.
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=30))
        from megalora import cpu_compat
        from tests import worker_state

        cpu_compat.enable()
        baseline = worker_state.capture()
    except BaseException:  # noqa: BLE001 - e.g. megalora fails to import
        reply("err", None, traceback.format_exc(), "")
        raise
    reply("ready", None, None, "")

    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            break
        task_id, blob = pickle.loads(payload)
        if blob is None:
            break
        out = io.StringIO()
        status, value = "ok", None
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                fn, args, kwargs = pickle.loads(blob)
                value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the test
            if type(exc).__name__ == "Skipped":  # pytest.skip() inside the body
                status, value = "skip", str(exc)
            else:
                status, value = "err", traceback.format_exc()
        try:
            worker_state.restore(baseline, process=True)
            # What outlives a task's cleanup lives as long as the worker: later collections skip it.
            gc.collect()
            gc.freeze()
        except Exception:  # noqa: BLE001
            if status == "ok":
                status, value = "err", "cleanup failed:\n" + traceback.format_exc()
        try:
            # Groups the task left alive, which the cleanup could not free, keep 100 Hz socket threads
            # running for the rest of the session: the parent then replaces this pool (forks are cheap).
            reply(status, task_id, value, out.getvalue(), procs.gloo_threads() > _RETIRE_AT_GLOO_THREADS)
        except Exception:  # noqa: BLE001 - e.g. an unpicklable return value
            reply("err", task_id, "return value could not be sent back:\n"
                  + traceback.format_exc(), out.getvalue())
    # Skip interpreter teardown (seconds with torch and megatron loaded);
    # the peers are exiting too, so the process group needs no goodbye.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


def _context():
    """Workers fork from one server that imported torch and megatron once (tests/pool_preload.py, or the
    module ``MEGALORA_POOL_PRELOAD`` names: the harness's own tests run sessions that only all-reduce)."""
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload([os.environ.get("MEGALORA_POOL_PRELOAD", "tests.pool_preload")])  # once
    return ctx


class _Pool:
    """N workers sharing one gloo world group."""

    def __init__(self, world_size: int):
        import torch.distributed as dist

        self.world_size = world_size
        self._task = 0
        # The parent hosts the rendezvous store on an OS-chosen port, so
        # there is no window in which another process can take the port.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True,
                                    wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=_STARTUP_TIMEOUT_S))
        ctx = _context()
        self.procs, self.conns = [], []
        saved = {k: os.environ.get(k) for k in _WORKER_ENV}
        os.environ.update(_WORKER_ENV)  # also for the fork server's imports, if it starts now
        environ = dict(os.environ)
        # A started child re-runs the parent's __main__ script unless it
        # has no __file__. Workers never need it (tasks live in importable
        # modules), and re-running an unguarded script would recurse.
        main = sys.modules.get("__main__")
        main_file = None
        if main is not None and getattr(main, "__spec__", None) is None:
            main_file = main.__dict__.pop("__file__", None)
        try:
            for rank in range(world_size):
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"multirank-{world_size}-{rank}",
                                   args=(rank, world_size, "127.0.0.1", self._store.port,
                                         child_end, os.getpid(), environ))
                proc.start()
                child_end.close()
                self.procs.append(proc)
                self.conns.append(parent_end)
        except BaseException:
            self.kill()  # not yet in _POOLS, so nobody else would ever stop these
            raise
        finally:
            if main_file is not None:
                main.__file__ = main_file
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        try:
            replies = self._collect(None, time.monotonic() + _STARTUP_TIMEOUT_S)
        except BaseException:  # e.g. Ctrl-C while the workers import torch
            self.kill()
            raise
        bad = [r for r, rep in enumerate(replies) if rep is None or rep[0] != "ready"]
        if bad:
            self.kill()
            raise RuntimeError(f"multirank pool of {world_size} failed to start on ranks {bad}:\n"
                               + "\n".join(str(replies[r] and replies[r][2]) for r in bad))

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def _collect(self, task_id, deadline: float) -> list:
        """Gathers one reply per rank until the deadline; None for silent ranks."""
        replies: list = [None] * self.world_size
        waiting = {c: r for r, c in enumerate(self.conns)}
        dead = {p.sentinel: r for r, p in enumerate(self.procs)}
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready = wait(list(waiting) + [s for s, r in dead.items() if r in waiting.values()],
                         timeout=remaining)
            for obj in ready:
                if obj in waiting:
                    rank = waiting[obj]
                    try:
                        msg = pickle.loads(obj.recv_bytes())
                    except (EOFError, OSError):
                        msg = ("dead", task_id, self._exit_text(rank), "")
                    if msg[0] != "ready" and msg[1] != task_id:
                        continue  # a stale answer from an earlier task
                    replies[rank] = msg
                    del waiting[obj]
                    if msg[0] in ("err", "dead"):
                        deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
                elif obj in dead and dead[obj] in waiting.values():
                    rank = dead[obj]
                    conn = self.conns[rank]
                    if conn.poll():  # it answered before exiting
                        continue
                    replies[rank] = ("dead", task_id, self._exit_text(rank), "")
                    del waiting[conn]
                    deadline = min(deadline, time.monotonic() + _GRACE_AFTER_FAILURE_S)
        return replies

    def _exit_text(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(timeout=1)
        return f"worker process exited (exit code {proc.exitcode})"

    def run(self, fn: Callable, args: tuple, kwargs: dict, timeout_s: float) -> list:
        self._task += 1
        task_id = self._task
        # Pickle once in the parent so unpicklable arguments fail here, clearly.
        blob = pickle.dumps((fn, args, kwargs))
        payload = pickle.dumps((task_id, blob))
        for conn in self.conns:
            conn.send_bytes(payload)
        started = time.monotonic()
        replies = self._collect(task_id, started + timeout_s)
        elapsed = time.monotonic() - started
        if any(rep is not None and rep[-1] is True for rep in replies):  # see the worker's reply
            self.shutdown()

        for rank, rep in enumerate(replies):
            if rep is not None and rep[3]:
                print(f"----- rank {rank} output -----\n{rep[3]}", end="")
        silent = [r for r, rep in enumerate(replies) if rep is None]
        failed = [r for r, rep in enumerate(replies)
                  if rep is not None and rep[0] not in ("ok", "skip")]
        if not silent and not failed:
            skipped = [rep[2] for rep in replies if rep[0] == "skip"]
            if skipped:
                import pytest

                pytest.skip(skipped[0])
            return [rep[2] for rep in replies]

        # Silent ranks are stuck (most likely in a collective whose partner
        # raised or never arrived): the only safe recovery is a fresh pool.
        if silent or any(replies[r][0] == "dead" for r in failed):
            self.kill()
        name = getattr(fn, "__qualname__", repr(fn))
        parts = [f"{name} on {self.world_size} ranks:"]
        for rank in failed:
            parts.append(f"\n===== rank {rank} failed =====\n{replies[rank][2]}")
        if silent:
            why = ("after another rank failed (probably stuck in a collective)" if failed
                   else f"within timeout_s={timeout_s:g}")
            parts.append(f"\nranks {silent} did not answer {why}; waited {elapsed:.1f} s. "
                         "The worker pool was killed and will be respawned.")
        raise MultiRankError("".join(parts))

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
        for proc in self.procs:
            proc.join(timeout=10)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []

    def shutdown(self) -> None:
        """Asks the workers to exit cleanly, killing any that do not."""
        payload = pickle.dumps((0, None))
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(payload)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()


_POOLS: dict[int, _Pool] = {}


def run_on_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 300,
                 **kwargs: Any) -> list:
    """Calls ``fn(*args, **kwargs)`` on each of ``world_size`` gloo ranks.

    Args:
        world_size: Number of ranks; one persistent pool is kept per size.
        fn: A module-level function (pickled by qualified name, so workers
            import its module), run on every rank with the same arguments.
        *args: Positional arguments for ``fn``; must be picklable.
        timeout_s: Seconds all ranks together have to answer.
        **kwargs: Keyword arguments for ``fn``; must be picklable.

    Returns:
        The return values, indexed by rank.

    Raises:
        MultiRankError: When any rank raised (with each failing rank's
            traceback) or did not answer in time.
    """
    qualname = getattr(fn, "__qualname__", "")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise TypeError(f"{fn!r} must be a module-level function so workers can import it")
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        if pool is not None:
            pool.kill()
        pool = _POOLS[world_size] = _Pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout_s)
    finally:
        if not pool.procs:  # killed after a failure; respawn lazily next time
            _POOLS.pop(world_size, None)


def shutdown_pools() -> None:
    """Stops every pool; safe to call more than once."""
    while _POOLS:
        _, pool = _POOLS.popitem()
        with contextlib.suppress(Exception):
            pool.shutdown()


# Registered after multiprocessing's own exit hook, so it runs first and the
# idle (non-daemon) workers are gone before multiprocessing joins them.
atexit.register(shutdown_pools)
