"""Starting and stopping ``torch.distributed`` and Megatron's parallel state.

* ``init_distributed`` starts ``torch.distributed`` from whatever launcher
  started the process (see ``megalora.launch_env``).
* ``init_parallel`` / ``destroy_parallel`` wrap Megatron's ``parallel_state``
  with argument checks, Megatron's seeding convention, and a record of the
  base seed that LoRA init uses (``megalora.lora_seed``). On a CPU-only torch
  ``init_parallel`` switches on ``megalora.cpu_compat`` first.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import random
from typing import Any

import torch
import torch.distributed as dist

from . import cpu_compat
from .launch_env import detect_launch_env, resolve_rendezvous
from .lora_seed import clear_lora_init_seed, set_lora_init_seed

__all__ = ["init_distributed", "init_parallel", "destroy_parallel", "is_initialized"]


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
    le = resolve_rendezvous(detect_launch_env(os.environ), os.environ)
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
    _STATE["owns_world"] = True


def shutdown_distributed() -> None:
    """Destroys the process groups, if :func:`init_distributed` started them: a launched job's last step.

    Left to interpreter exit, the process group's C++ threads are torn down
    during static destruction, which now and then aborts a finished job
    ("terminate called without an active exception", SIGABRT). A default
    group that someone else started (a test harness, a user's script) is left
    alone.
    """
    if not _STATE.get("owns_world") or not dist.is_initialized():
        return
    with contextlib.suppress(Exception):  # megatron's groups may be up or not
        _destroy_parallel(release=False)  # the process is ending: no need to free the groups early
    dist.destroy_process_group()
    _STATE["owns_world"] = False


# The layout init_parallel set up, and the process groups that existed before
# it, so destroy_parallel can tear down exactly what Megatron created.
_STATE: dict[str, Any] = {"key": None, "groups_before": None, "owns_world": False}


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
            through ``megalora.lora_seed.lora_init_seed()``.
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
        cpu_compat.enable()

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
    set_lora_init_seed(seed)


def destroy_parallel() -> None:
    """Tears down Megatron's parallel state; the default process group stays.

    Also destroys the process groups that ``init_parallel`` had Megatron
    create, so that repeated init/destroy cycles in one process (tests, sweeps)
    do not leak sockets and threads.
    """
    _destroy_parallel(release=True)


def _destroy_parallel(release: bool) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    before = _STATE["groups_before"]
    destroyed = False
    if before is not None and dist.is_initialized():
        for group in _live_groups() - before:
            if group is not dist.GroupMember.WORLD:
                with contextlib.suppress(Exception):  # already gone is fine
                    dist.destroy_process_group(group)
                    destroyed = True
    _STATE.update(key=None, groups_before=None)
    _forget_destroyed_groups(ps)
    if destroyed and release:
        # A destroyed group lives on while something still points at it: a model's modules (reference
        # cycles), and megatron's RotaryEmbedding.forward lru_cache, which keeps its last 32 callers (and
        # their groups) alive. Each gloo group keeps a socket loop thread that wakes 100 times a second, so a
        # process that re-initializes (a sweep, a test worker) would pile up threads that eat the CPU.
        _release_rotary_cache()
        gc.collect()
    clear_lora_init_seed()


def _forget_destroyed_groups(ps) -> None:
    """Clears the parallel_state globals that destroy_model_parallel leaves pointing at destroyed groups.

    megatron-core 0.16.1 misses ``_INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP`` and its gloo twin, so each
    layout's groups stayed alive (socket threads included) until the next initialization replaced them.
    """
    live = _live_groups() if dist.is_initialized() else set()
    for name, value in list(vars(ps).items()):
        if name.startswith("_") and isinstance(value, dist.ProcessGroup) and value not in live:
            setattr(ps, name, None)


def _release_rotary_cache() -> None:
    with contextlib.suppress(ImportError, AttributeError):
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        RotaryEmbedding.forward.cache_clear()


def is_initialized() -> bool:
    """Whether distributed and Megatron's model-parallel groups are both up."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from megatron.core import parallel_state as ps

    return ps.model_parallel_is_initialized()
