"""Which launcher started this process, and where its ranks meet.

``detect_launch_env`` reads rank, world size and the rendezvous address from
whatever launcher started the process (torchrun, Slurm's srun, mpirun, or
nothing at all); ``resolve_rendezvous`` fills in what the launcher left open.
Starting ``torch.distributed`` from the result is
``megalora.parallel_start.init_distributed``'s job; ``megalora.launcher`` is
the CLI's own torchrun starter, a different thing.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
from typing import Mapping

__all__ = ["LaunchEnv", "detect_launch_env", "resolve_rendezvous"]

_DEFAULT_PORT = 29500


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it.

    Attributes:
        rank: Global rank of this process.
        world_size: Number of processes in the job.
        local_rank: Rank among the processes on this node (the GPU index).
        master_addr: Rendezvous host, or None when it must still be agreed
            (MPI without ``MASTER_ADDR``) or picked (single process).
        master_port: Rendezvous port, or None for "pick a free one".
        source: Which launcher was recognised: ``"torchrun"``, ``"slurm"``,
            ``"mpi"`` or ``"single"``.
    """

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str


def _first_slurm_host(nodelist: str, use_scontrol: bool = True) -> str:
    """Returns the first host of a Slurm node list such as ``node[01-04],gpu7``."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # fall back to parsing the simple forms ourselves
    # Split on commas outside brackets: "a[1-2,5],b" -> ["a[1-2,5]", "b"].
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    # Every bracket group contributes its first value; zero padding is kept
    # because the lower bound is copied verbatim.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)


def detect_launch_env(environ: Mapping[str, str] | None = None, *,
                      use_scontrol: bool = True) -> LaunchEnv:
    """Reads rank, world size and rendezvous address from a launcher's env.

    Pure apart from the optional ``scontrol`` call, so it can be tested with
    fake environment dicts. Precedence: torchrun-style variables (also what
    Slurm "pattern A" runs under), then Slurm, then MPI, then a single process.

    Args:
        environ: The environment to read; ``os.environ`` when None.
        use_scontrol: Whether ``scontrol show hostnames`` may be called to
            expand ``SLURM_JOB_NODELIST``.

    Returns:
        The LaunchEnv. Unknown rendezvous fields are None.
    """
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR") or None
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None

    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]),
                         int(env.get("LOCAL_RANK", 0)), addr or "127.0.0.1",
                         port or _DEFAULT_PORT, "torchrun")

    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None:
            addr = _first_slurm_host(nodelist, use_scontrol) if nodelist else "127.0.0.1"
        if port is None:
            # Derive the port from the job id so that two jobs sharing a node
            # do not collide on 29500.
            job = env.get("SLURM_JOB_ID")
            port = 10000 + int(job) % 20000 if job and job.isdigit() else _DEFAULT_PORT
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")

    for rank_key, size_key, local_keys in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
        ("PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
        ("PMIX_RANK", "PMIX_SIZE", ("PMIX_LOCAL_RANK",)),
    ):
        if rank_key in env and size_key in env:
            local = next((int(env[k]) for k in local_keys if k in env), 0)
            # Address and port stay None unless given: ranks agree on them
            # through mpi4py in init_distributed.
            return LaunchEnv(int(env[rank_key]), int(env[size_key]), local, addr, port, "mpi")

    return LaunchEnv(0, 1, 0, addr or "127.0.0.1", port, "single")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _agree_rendezvous_mpi(le: LaunchEnv, environ: Mapping[str, str]) -> LaunchEnv:
    """Fills in a missing MPI rendezvous: via mpi4py, else single-node localhost."""
    try:
        from mpi4py import MPI  # imported lazily: it initialises MPI
    except ImportError:
        local_size = environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") or environ.get("MPI_LOCALNRANKS")
        if le.world_size == 1 or (local_size is not None and int(local_size) == le.world_size):
            # One node: every rank can name localhost and the fixed default port.
            port = le.master_port or (_free_port() if le.world_size == 1 else _DEFAULT_PORT)
            return dataclasses.replace(le, master_addr=le.master_addr or "127.0.0.1",
                                       master_port=port)
        raise RuntimeError(
            "Launched under MPI without MASTER_ADDR/MASTER_PORT and without mpi4py: set "
            "MASTER_ADDR and MASTER_PORT, or `pip install mpi4py` so rank 0 can broadcast them."
        ) from None
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        host = le.master_addr or socket.gethostbyname(socket.gethostname())
        payload = (host, le.master_port or _free_port())
    host, port = comm.bcast(payload, root=0)
    return dataclasses.replace(le, master_addr=host, master_port=port)



def resolve_rendezvous(le: LaunchEnv, environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Fills in a rendezvous address and port the launcher did not give.

    Under MPI the ranks agree on them (``_agree_rendezvous_mpi``); a single
    process picks a free local port, since no other rank needs to know it.

    Args:
        le: What ``detect_launch_env`` found.
        environ: The environment to read; ``os.environ`` when None.

    Returns:
        The LaunchEnv with ``master_addr`` and ``master_port`` both set.
    """
    env = os.environ if environ is None else environ
    if le.source == "mpi" and (le.master_addr is None or le.master_port is None):
        le = _agree_rendezvous_mpi(le, env)
    if le.master_port is None:
        # Only reached for a single process, so no other rank needs the port.
        le = dataclasses.replace(le, master_port=_free_port())
    return le
