"""megalora.fork_start: a module's main in a forked child, as ``python -u -m MODULE`` would run it."""

from __future__ import annotations

import os
import signal
import sys
import tempfile

import pytest

from megalora import fork_start
from megalora.launcher import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not fork_start.can_fork(), reason="ranks are forks only on Linux without CUDA")


def _run(module: str, args: list[str], env: dict) -> tuple[int, str]:
    with tempfile.TemporaryFile() as out:
        child = fork_start.start(module, args, env, out.fileno())
        code = child.wait()
        out.seek(0)
        return code, out.read().decode()


def main(argv):
    """A module main for the tests below (this file, imported by name in the child)."""
    import torch

    what = argv[0]
    if what == "report":
        print(f"threads={torch.get_num_threads()} sigterm={signal.getsignal(signal.SIGTERM) == signal.SIG_DFL} "
              f"argv={sys.argv[1:]} env={os.environ.get('FORK_START_TEST')}")
        print("unflushed", end="")  # an unbuffered child loses nothing at os._exit
        return 0
    if what == "status":
        return int(argv[1])
    if what == "exit":
        raise SystemExit("stopped with a message")
    raise RuntimeError("boom in the child")


def test_child_runs_main_with_its_environment_threads_and_default_signals():
    # The agent's handlers, which the forked ranks must not keep.
    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        env = dict(child_env(), OMP_NUM_THREADS="1", FORK_START_TEST="yes")
        code, out = _run("tests.test_fork_start", ["report", "x"], env)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 0, out
    assert "threads=1 sigterm=True argv=['report', 'x'] env=yes" in out and out.endswith("unflushed"), out
    assert os.environ.get("FORK_START_TEST") is None  # this process's environment is untouched


def test_exit_status_and_traceback_come_back():
    assert _run("tests.test_fork_start", ["status", "3"], child_env())[0] == 3
    code, out = _run("tests.test_fork_start", ["raise"], child_env())
    assert code == 1 and "RuntimeError: boom in the child" in out and "Process" not in out.splitlines()[0]
    assert _run("tests.test_fork_start", ["exit"], child_env()) == (1, "stopped with a message\n")


def test_train_config_error_is_one_line_with_status_2():
    """What the CLI's forked ranks run: megalora.train's main, its config errors as one line."""
    env = child_env()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code, out = _run("megalora.train", ["configs/tiny_gpt.yaml", "lora.rr=4"], env)
    finally:
        os.chdir(cwd)
    assert code == 2 and "error:" in out and "lora.rr" in out and "Traceback" not in out, out
