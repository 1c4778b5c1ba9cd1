"""Process start-up, Megatron parallel state, and the CPU compatibility layer.

Three jobs live here:

* ``detect_launch_env`` / ``init_distributed`` read whatever launcher started
  the process (torchrun, Slurm's srun, mpirun, or nothing at all) and start
  ``torch.distributed`` from it.
* ``init_parallel`` / ``destroy_parallel`` wrap Megatron's
  ``parallel_state`` with argument checks, Megatron's seeding convention, and
  a record of the base seed that LoRA init uses (``lora_init_seed``).
* ``enable_cpu_compat`` lets megatron-core 0.16.1 run on a CPU-only torch
  build with gloo, so the parallel code paths can be tested without a GPU.

CPU compatibility: the choice
-----------------------------
megatron-core hard-codes CUDA in two kinds of places. ``torch.cuda.*``
helpers (``current_device()`` used as a tensor device in some thirty call
sites, ``synchronize()`` in p2p communication, the RNG tracker's state
functions) are plain Python functions, so a ``TorchFunctionMode`` never sees
them; and a handful of literal ``device="cuda"`` / ``Tensor.cuda()`` calls
(the causal masks, the schedules' ``total_num_tokens``, the tied-embedding
copy under PP).

* ``torch.cuda.current_device`` and ``torch.cuda.synchronize`` are replaced
  process-wide: on a machine without CUDA the originals can only raise, so
  the only code whose behaviour changes is code that would have crashed.
  ``torch.cuda.is_available()`` is never faked, so user code that asks still
  learns the truth.
* The literal-``cuda`` sites are patched one by one: each megatron function
  that contains one is wrapped so that it runs inside ``_CudaToCpuMode``, a
  ``TorchFunctionMode`` that maps a CUDA ``device=`` argument (and
  ``Tensor.cuda()``) to the CPU. The mode is active only inside those
  functions, so it costs nothing anywhere else and never rewrites a user's
  own ``device="cuda"`` outside a Megatron schedule call.
* The RNG tracker keeps CPU generator states: ``add`` seeds a CPU state,
  ``fork`` swaps it into the default CPU generator and swaps the caller's
  state back afterwards, and the module's ``_get/_set_cuda_rng_state`` (used
  by activation checkpointing) read and write the CPU generator.
* Batched pipeline p2p (``batch_p2p_comm=True``, the default) is routed to
  Megatron's unbatched ``_p2p_ops``: gloo matches a pair's messages in
  posting order, and the batched order swaps activations and gradients at
  PP=2 under the interleaved schedule.

Nothing is patched when ``torch.cuda.is_available()`` is True.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import os
import random
import re
import shutil
import socket
import subprocess
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

__all__ = [
    "LaunchEnv", "detect_launch_env", "init_distributed", "init_parallel", "destroy_parallel",
    "is_initialized", "lora_init_seed", "set_lora_init_seed", "enable_cpu_compat", "cpu_compat_active",
]

_DEFAULT_PORT = 29500


# --------------------------------------------------------------------------
# Launcher environment
# --------------------------------------------------------------------------


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


def init_distributed(backend: str | None = None, timeout_s: float = 600) -> None:
    """Starts ``torch.distributed`` from the launcher's environment, once.

    Does nothing when a default process group already exists.

    Args:
        backend: Process-group backend; ``"nccl"`` when CUDA is available,
            else ``"gloo"``.
        timeout_s: Timeout of the rendezvous and of collectives.
    """
    if dist.is_available() and dist.is_initialized():
        return
    le = detect_launch_env(os.environ)
    if le.source == "mpi" and (le.master_addr is None or le.master_port is None):
        le = _agree_rendezvous_mpi(le, os.environ)
    if le.master_port is None:
        # Only reached for a single process, so no other rank needs the port.
        le = dataclasses.replace(le, master_port=_free_port())
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
    # Export what we found so that code reading the usual variables (Megatron
    # utilities, user scripts) sees the same values we used.
    for key, value in (("RANK", le.rank), ("WORLD_SIZE", le.world_size),
                       ("LOCAL_RANK", le.local_rank), ("MASTER_ADDR", le.master_addr),
                       ("MASTER_PORT", le.master_port)):
        os.environ.setdefault(key, str(value))
    host = f"[{le.master_addr}]" if ":" in le.master_addr else le.master_addr
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{host}:{le.master_port}",
        rank=le.rank, world_size=le.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


# --------------------------------------------------------------------------
# Megatron parallel state
# --------------------------------------------------------------------------

_STATE: dict[str, Any] = {"seed": None, "key": None, "groups_before": None}


def _live_groups() -> set:
    return set(dist.distributed_c10d._world.pg_map.keys())


def init_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                  virtual_pipeline_model_parallel_size: int | None = None, seed: int = 1234,
                  **kwargs: Any) -> None:
    """Starts distributed, Megatron's model-parallel groups, and seeds all RNGs.

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        virtual_pipeline_model_parallel_size: Virtual chunks per PP stage, or None.
        seed: Base seed. Each PP stage seeds with ``seed + 100 * pp_rank``
            (Megatron's convention); LoRA init reads the base seed back
            through ``lora_init_seed()``.
        **kwargs: Passed on to ``parallel_state.initialize_model_parallel``.

    Raises:
        ValueError: When the world size is not divisible by
            ``tensor_model_parallel_size * pipeline_model_parallel_size``
            (times ``context_parallel_size``), raised on every rank before
            any collective so no rank hangs.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    init_distributed()
    if not torch.cuda.is_available():
        enable_cpu_compat()

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    cp = int(kwargs.get("context_parallel_size", 1))
    world = dist.get_world_size()
    if tp < 1 or pp < 1 or cp < 1 or world % (tp * pp * cp):
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp}"
            + (f" x context_parallel_size={cp}" if cp != 1 else "")
        )

    vpp = virtual_pipeline_model_parallel_size
    key = (tp, pp, vpp, tuple(sorted(kwargs.items(), key=str)))
    if ps.model_parallel_is_initialized():
        if _STATE["key"] is not None:
            same = _STATE["key"] == key
        else:  # set up by someone else: keep it if the layout matches
            same = (ps.get_tensor_model_parallel_world_size(),
                    ps.get_pipeline_model_parallel_world_size(),
                    ps.get_virtual_pipeline_model_parallel_world_size()) == (tp, pp, vpp)
        if not same:
            destroy_parallel()
    if not ps.model_parallel_is_initialized():
        before = _live_groups()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
            **kwargs,
        )
        _STATE["groups_before"] = before
        _STATE["key"] = key

    stage_seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)
    _STATE["seed"] = int(seed)


def destroy_parallel() -> None:
    """Tears down Megatron's parallel state; the default process group stays.

    Also destroys the process groups that ``init_parallel`` had Megatron
    create, so that repeated init/destroy cycles in one process (tests, sweeps)
    do not leak sockets.
    """
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    before = _STATE["groups_before"]
    if before is not None and dist.is_initialized():
        for group in _live_groups() - before:
            if group is not dist.GroupMember.WORLD:
                with contextlib.suppress(Exception):  # already gone is fine
                    dist.destroy_process_group(group)
    _STATE.update(seed=None, key=None, groups_before=None)


def is_initialized() -> bool:
    """Whether distributed and Megatron's model-parallel groups are both up."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()


def lora_init_seed() -> int:
    """The base seed given to ``init_parallel``, else ``torch.initial_seed()``.

    LoRA factors are drawn from generators derived from this seed, which is
    the same on every rank, so the init does not depend on the layout.
    """
    return _STATE["seed"] if _STATE["seed"] is not None else torch.initial_seed()


def set_lora_init_seed(seed: int) -> None:
    """Sets the base seed of LoRA init when Megatron's state was started elsewhere.

    Megatron-LM seeds each pipeline stage with ``seed + 100 * pp_rank``, so
    ``torch.initial_seed()`` differs across stages; its plug-in passes the
    base ``--seed`` here so the init stays layout-independent.
    """
    _STATE["seed"] = int(seed)


# --------------------------------------------------------------------------
# CPU compatibility layer
# --------------------------------------------------------------------------

_COMPAT = {"active": False}


def _is_cuda_device(value: Any) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    # A bare int as a device means a CUDA ordinal.
    return isinstance(value, int) and not isinstance(value, bool)


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps CUDA ``device=`` arguments, ``Tensor.cuda()`` and ``.to("cuda")`` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], bool) \
                and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _on_cpu(fn: Callable) -> Callable:
    """Wraps a megatron function that hard-codes CUDA so it runs on CPU."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaToCpuMode():
            return fn(*args, **kwargs)

    wrapper._megalora_cpu_wrapped = True
    return wrapper


def _get_cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()  # already a fresh copy, so `clone` needs nothing


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


def _tracker_add(self, name: str, seed: int) -> None:
    """``CudaRNGStatesTracker.add`` with a CPU generator state."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


@contextlib.contextmanager
def _tracker_fork(self, name: str = "model-parallel-rng"):
    """``CudaRNGStatesTracker.fork`` on the default CPU generator.

    Megatron's own fork warns when the CPU state changes inside it; here the
    CPU generator *is* the forked one, so that check is left out.
    """
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    orig_state = torch.get_rng_state()
    orig_name = self._current_state_name
    if orig_name != "default-rng":
        self.states_[orig_name] = orig_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same "
                            f"as the desired state name {name}.")
        self.states_[name] = torch.get_rng_state()
        if orig_name != "default-rng":
            orig_state = self.states_[orig_name]
        torch.set_rng_state(orig_state)
        self._current_state_name = orig_name


def enable_cpu_compat() -> None:
    """Lets megatron-core 0.16.1 run on a CPU-only torch with gloo.

    Idempotent. Does nothing at all when ``torch.cuda.is_available()``. See
    the module docstring for what is patched and why it is scoped that way.
    """
    if torch.cuda.is_available() or _COMPAT["active"]:
        return
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import p2p_communication as p2p
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None  # CPU ops are synchronous

    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.CudaRNGStatesTracker.add = _tracker_add
    mrandom.CudaRNGStatesTracker.fork = _tracker_fork

    # Literal device="cuda" sites. fused_softmax imported the mask helpers by
    # name, so its references are replaced too.
    for module, names in (
        (tutils, ("get_default_causal_mask", "get_sliding_window_causal_mask")),
        (fused_softmax, ("get_default_causal_mask", "get_sliding_window_causal_mask")),
        (schedules, ("forward_backward_no_pipelining",
                     "forward_backward_pipelining_without_interleaving",
                     "forward_backward_pipelining_with_interleaving")),
    ):
        for name in names:
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "_megalora_cpu_wrapped", False):
                setattr(module, name, _on_cpu(fn))
    # gloo pairs a rank's isends with its peer's irecvs in posting order.
    # The batched path posts send_prev before send_next, so at PP=2 (prev and
    # next stage are the same rank) the interleaved schedule's activations
    # and gradients arrive swapped, silently. Megatron's unbatched path posts
    # in an order both parities agree on; use it.
    unbatched = p2p._p2p_ops
    p2p._batched_p2p_ops = lambda **kw: list(unbatched(**kw).values())
    lm = language_module.LanguageModule
    lm.setup_embeddings_and_output_layer = _on_cpu(lm.setup_embeddings_and_output_layer)
    _COMPAT["active"] = True


def cpu_compat_active() -> bool:
    """Whether ``enable_cpu_compat`` has patched this process."""
    return _COMPAT["active"]
