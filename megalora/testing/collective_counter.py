"""Counting the collectives a block of code issues, for tests and benchmarks.

:func:`count_collectives` wraps ``torch.distributed``'s functions (and
megatron-core's module-level aliases of them) for the duration of a block and
puts every original back afterwards.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["CollectiveLog", "count_collectives"]

_COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce_scatter",
    "broadcast",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
    "all_to_all_single",
)


@dataclass
class CollectiveLog:
    """What :func:`count_collectives` saw: calls and bytes per collective name."""

    calls: Counter = field(default_factory=Counter)
    bytes: Counter = field(default_factory=Counter)
    shapes: list = field(default_factory=list)

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _tensor_bytes(args, kwargs) -> tuple[int, tuple]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.numel() * a.element_size(), tuple(a.shape)
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return sum(t.numel() * t.element_size() for t in a), tuple(a[0].shape)
    return 0, ()


def _megatron_aliases() -> list:
    """Module-level aliases of torch.distributed functions inside megatron-core."""
    out = []
    try:
        from megatron.core import utils as mcore_utils

        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            if hasattr(mcore_utils, name):
                out.append((mcore_utils, name))
        from megatron.core.tensor_parallel import mappings

        for name in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            if hasattr(mappings, name):
                out.append((mappings, name))
    except ImportError:  # megatron-core is optional for plain layers
        pass
    return out


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Count every torch.distributed collective issued inside the block.

    Wraps ``torch.distributed``'s functions (and megatron-core's module-level
    aliases of them) for the duration of the block, records calls, bytes and
    the first tensor's shape, and forwards to the real function.
    """
    log = CollectiveLog()
    originals = []

    def wrap(owner, name, label):
        real = getattr(owner, name)
        if getattr(real, "_megalora_counted", False):
            return

        def counted(*args, **kwargs):
            nbytes, shape = _tensor_bytes(args, kwargs)
            log.calls[label] += 1
            log.bytes[label] += nbytes
            log.shapes.append((label, shape))
            return real(*args, **kwargs)

        counted._megalora_counted = True
        originals.append((owner, name, real))
        setattr(owner, name, counted)

    for name in _COUNTED:
        if hasattr(dist, name):
            wrap(dist, name, name)
    for owner, name in _megatron_aliases():
        real = getattr(owner, name)
        wrap(owner, name, getattr(real, "__name__", name))
    try:
        yield log
    finally:
        for owner, name, real in reversed(originals):
            setattr(owner, name, real)
