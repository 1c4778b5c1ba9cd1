"""The test harness leaves no process behind: after passing, failing, timing-out and interrupted sessions.

Each case runs a small pytest session in a subprocess with the suite's own
conftest (``-p tests.conftest``) and multi-rank harness. Every process the
session starts inherits a unique environment tag, so the processes left over
after it exits are found wherever they were re-parented.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests import procs
from tests.conftest import STRAY_GRACE_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAG = "MEGALORA_LEAK_TAG"

INNER = '''
import os, subprocess, sys, time
from tests.multirank import run_on_ranks
from tests.harness.test_multirank import _all_reduce_rank, _mark_then_stuck, _raise_on_rank_1, _stuck_collective


def test_passes():
    assert run_on_ranks(2, _all_reduce_rank, 0) == [(0, 3.0), (1, 3.0)]


def test_fails_on_a_rank():
    run_on_ranks(2, _raise_on_rank_1)


def test_times_out_in_a_collective():
    run_on_ranks(2, _stuck_collective, timeout_s=3)


def test_blocks():  # interrupted from outside
    open(os.environ["MARKER"], "w").close()
    run_on_ranks(2, _mark_then_stuck, os.environ["MARKER"], timeout_s=600)


def test_loses_a_process():  # a test bug the session check must catch
    ready = os.environ["MARKER"] + ".lost"
    subprocess.Popen([sys.executable, "-c", f"import time; open({ready!r}, 'w').close(); time.sleep(600)"],
                     start_new_session=True)
    # Until its exec is done, the child's /proc cmdline can read empty (seen on a loaded machine):
    # wait for it to run, so the session's report names it.
    for _ in range(1200):
        if os.path.exists(ready):
            break
        time.sleep(0.1)
'''


def _session(tmp_path, select: str):
    tag = uuid.uuid4().hex
    (tmp_path / "test_inner.py").write_text(INNER)
    # Its tasks only all-reduce (a light fork server), and it starts no launcher whose children need a
    # moment to exit: a lost process is called lost after 1 s.
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MARKER=str(tmp_path / "marker"), MEGALORA_POOL_PRELOAD="torch.distributed",
               **{TAG: tag, STRAY_GRACE_ENV: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
           "--rootdir", str(tmp_path), "-k", select, str(tmp_path / "test_inner.py")]
    # SIGINT back to its default: a shell's background job inherits it ignored.
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return child, tag


def _pool_workers(tag: str) -> list[int]:
    """The inner session's pool workers: children of its fork server, which shares their command line."""
    server = [p for p in procs.tagged(TAG, tag) if procs.FORKSERVER in procs.cmdline(p)]
    return [p for p in server if procs.parent(p) in server]


def _survivors(tag: str, wait_s: float = 30.0) -> list[str]:
    """Tagged processes still alive ``wait_s`` after the session ended (PDEATHSIG and EOF act asynchronously)."""
    deadline = time.monotonic() + wait_s
    while procs.tagged(TAG, tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = procs.tagged(TAG, tag)
    described = [f"{pid} {procs.cmdline(pid)[:150]}" for pid in left]
    procs.end(left)  # never leave them to the next test
    return described


def test_failing_and_timing_out_sessions_leave_nothing(tmp_path):
    child, tag = _session(tmp_path, "passes or fails or times_out")
    out, _ = child.communicate(timeout=900)
    assert "1 failed" in out or "2 failed" in out, out[-3000:]
    assert "did not answer within timeout_s=3" in out and "boom from rank 1" in out, out[-3000:]
    assert "left processes running" not in out, out[-3000:]
    assert _survivors(tag) == []


def test_a_lost_process_fails_the_session_and_is_ended(tmp_path):
    child, tag = _session(tmp_path, "loses_a_process")
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 1 and "1 passed" in out, out[-3000:]
    assert "left processes running (now ended)" in out and "time.sleep(600)" in out, out[-3000:]
    assert "(left by test_inner.py::test_loses_a_process)" in out, out[-3000:]
    assert _survivors(tag) == []


@pytest.mark.parametrize("sig,when", [(signal.SIGINT, "in a task"), (signal.SIGKILL, "at worker start")])
def test_interrupted_session_leaves_nothing(tmp_path, sig, when):
    """Ctrl-C runs the session's cleanup; a kill leaves it to the workers' parent-death signal."""
    child, tag = _session(tmp_path, "blocks")
    try:
        deadline = time.monotonic() + 600
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)  # as soon as they exist: a kill before they armed PDEATHSIG is the race to survive
            workers = _pool_workers(tag)
        assert len(workers) == 2, "the inner session never started its workers"
        if when == "in a task":
            ranks = [tmp_path / f"marker.rank{r}" for r in range(2)]
            while not all(m.exists() for m in ranks) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert all(m.exists() for m in ranks), "the task never started on both ranks"
            time.sleep(1)  # from the marker to rank 0 blocking in its all-reduce is one call
        child.send_signal(sig)
        child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert _survivors(tag) == []
