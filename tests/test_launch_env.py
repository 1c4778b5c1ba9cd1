"""Tests of megalora.launch_env: which launcher started the process and where ranks meet (no processes)."""

from __future__ import annotations

import dataclasses

import pytest

from megalora import launch_env
from megalora.launch_env import LaunchEnv, detect_launch_env


def test_detect_torchrun():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "2"}
    assert detect_launch_env(env) == LaunchEnv(3, 8, 1, "10.0.0.1", 1234, "torchrun")


def test_detect_slurm():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu-[07-10,12],cpu1", "SLURM_JOB_ID": "4242"}
    le = detect_launch_env(env, use_scontrol=False)
    assert le == LaunchEnv(5, 8, 1, "gpu-07", 10000 + 4242 % 20000, "slurm")
    env.update(MASTER_ADDR="head", MASTER_PORT="29999")
    le = detect_launch_env(env, use_scontrol=False)
    assert (le.master_addr, le.master_port) == ("head", 29999)


@pytest.mark.parametrize("nodelist, first", [
    ("node[01-04]", "node01"), ("a,b", "a"), ("single", "single"),
    ("rack[2-3]-n[5,7]", "rack2-n5"), ("x[9]", "x9"),
])
def test_slurm_nodelist_forms(nodelist, first):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": nodelist}
    assert detect_launch_env(env, use_scontrol=False).master_addr == first


def test_detect_mpi():
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert detect_launch_env(ompi) == LaunchEnv(2, 4, 0, None, None, "mpi")
    pmi = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MASTER_ADDR": "h",
           "MASTER_PORT": "7"}
    assert detect_launch_env(pmi) == LaunchEnv(1, 2, 1, "h", 7, "mpi")


def test_mpi_rendezvous_through_mpi4py(monkeypatch):
    import sys
    import types

    class Comm:
        def __init__(self, rank):
            self.rank, self.sent = rank, None

        def Get_rank(self):
            return self.rank

        def bcast(self, obj, root=0):
            self.sent = obj
            return obj if self.rank == root else ("10.1.2.3", 4567)

    le = LaunchEnv(0, 4, 0, None, None, "mpi")
    for rank, expected_host in ((0, None), (3, "10.1.2.3")):
        comm = Comm(rank)
        fake = types.ModuleType("mpi4py")
        fake.MPI = types.SimpleNamespace(COMM_WORLD=comm)
        monkeypatch.setitem(sys.modules, "mpi4py", fake)
        got = launch_env._agree_rendezvous_mpi(dataclasses.replace(le, rank=rank), {})
        if rank == 0:  # rank 0 picks host and a free port and broadcasts them
            assert comm.sent == (got.master_addr, got.master_port) and got.master_port > 0
        else:
            assert comm.sent is None and (got.master_addr, got.master_port) == (expected_host, 4567)


def test_detect_single_process_default():
    assert detect_launch_env({}) == LaunchEnv(0, 1, 0, "127.0.0.1", None, "single")
