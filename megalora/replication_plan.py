"""The layout arithmetic of ``layer_replication``: which source layer each new position copies, and
how the new stack is split over pipeline stages (see :mod:`megalora.replication`).

Pure functions on ints, so every rank computes the same plan without talking.
"""

from __future__ import annotations

from typing import Optional, Sequence



def expand_layer_map(layer_map: Sequence[Sequence[int]], num_layers: int) -> list[int]:
    """The source index of every layer of the new stack.

    Raises:
        ValueError: If a range is malformed, empty or out of bounds.
    """
    error = layer_map_error(layer_map, num_layers)
    if error:
        raise ValueError(error)
    return [i for start, end in layer_map for i in range(start, end)]


def layer_map_error(layer_map, num_layers: int) -> Optional[str]:
    """Why ``layer_map`` is not a valid ``layer_replication`` for ``num_layers`` layers, or ``None``."""
    fix = (f"Use [start, end) pairs with 0 <= start < end <= {num_layers} (the model's number of layers), "
           "e.g. [[0, 4], [2, 5]]")
    if not isinstance(layer_map, (list, tuple)) or not layer_map:
        return f"layer_replication={layer_map!r} must be a non-empty list of [start, end) ranges. {fix}"
    for pair in layer_map:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            return f"layer_replication: {pair!r} is not a [start, end) pair of ints. {fix}"
        start, end = pair
        if start >= end:
            return f"layer_replication: range [{start}, {end}) is empty. {fix}"
        if start < 0 or end > num_layers:
            return (f"layer_replication: range [{start}, {end}) is out of bounds for a model with {num_layers} "
                    f"layers. {fix}")
    return None


def balanced_split(total: int, pp: int, vp: int) -> list[list[int]]:
    """Layers per virtual stage, ``counts[pp_rank][vp_stage]`` (see the module docstring)."""
    stages = pp * vp
    base, extra = divmod(total, stages)
    return [[base + (v * pp + p < extra) for v in range(vp)] for p in range(pp)]


def stage_starts(counts: list[list[int]]) -> list[list[int]]:
    """First global index of each virtual stage, in megatron's virtual-stage order."""
    pp, vp = len(counts), len(counts[0])
    starts = [[0] * vp for _ in range(pp)]
    offset = 0
    for v in range(vp):
        for p in range(pp):
            starts[p][v] = offset
            offset += counts[p][v]
    return starts
