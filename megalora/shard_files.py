"""Safetensors shard files written tensor by tensor, as ``transformers`` lays them out.

The merged export knows every tensor's name, shape and dtype before it has
any of their values, so each file's safetensors header is written first and
the tensors' bytes follow one by one as they arrive: a file is never held in
memory. One file is ``model.safetensors``; several are
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(transformers' ``save_pretrained`` convention, which its ``from_pretrained``
reads).
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Optional, Union

import torch

from .atomic_write import AtomicFile, fsync_dir, write_text

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

# (name, shape, dtype) of one tensor of a file, in file order.
Planned = tuple[str, tuple, torch.dtype]


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string like ``"5GB"`` / ``"500MiB"``.

    Raises:
        ValueError: Naming ``max_shard_size``, for anything else.
    """
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size; give bytes (int) or e.g. '5GB', '500MB'")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def nbytes(shape: tuple, dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


def header(entries: list[Planned]) -> bytes:
    """The safetensors header of a file holding these tensors' bytes in this order."""
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype in entries:
        size = nbytes(shape, dtype)
        meta[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(text)) + text


def split_shards(plan: list[Planned], max_bytes: int) -> list[list[int]]:
    """Greedy split of the ordered plan into shards of at most ``max_bytes`` (one tensor may exceed it)."""
    shards, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(plan):
        size_i = nbytes(shape, dtype)
        if current and size + size_i > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += size_i
    return shards + ([current] if current else [])


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardWriter:
    """Writes the planned tensors, in plan order, into shard files; collects the first error.

    After an error it keeps accepting tensors (and drops them), so that a
    caller that receives them from other ranks leaves no sender waiting; the
    caller then raises :attr:`error` on every rank.
    """

    def __init__(self, directory: str, plan: list[Planned], max_bytes: int, metadata: dict):
        self.directory, self.plan, self.metadata = directory, plan, metadata
        self.shards = split_shards(plan, max_bytes)
        self.names = shard_names(len(self.shards))
        self.shard_of = [s for s, members in enumerate(self.shards) for _ in members]
        self.total_size = sum(nbytes(shape, dtype) for _, shape, dtype in plan)
        self.next, self.handle, self.error = 0, None, None

    @property
    def files(self) -> list[str]:
        return self.names + ([INDEX_NAME] if len(self.names) > 1 else [])

    def fail(self, message: str) -> None:
        """Record ``message`` (the first one wins) and drop the file being written."""
        self.error = self.error or message
        if self.handle is not None:
            self.handle.abort()
        self.handle = None

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (its name, shape and dtype must be the planned ones)."""
        index, self.next = self.next, self.next + 1
        if self.error:
            return
        want = self.plan[index] if index < len(self.plan) else None
        if want is None or (key, tuple(tensor.shape), tensor.dtype) != (want[0], tuple(want[1]), want[2]):
            self.fail(f"merged export: got {key} {tuple(tensor.shape)} {tensor.dtype}, planned {want}")
            return
        shard = self.shard_of[index]
        try:
            if index == self.shards[shard][0]:
                self.handle = AtomicFile(os.path.join(self.directory, self.names[shard]), sync_dir=False)
                self.handle.write(header([self.plan[i] for i in self.shards[shard]]))
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            self.handle.write(memoryview(data))
            if index == self.shards[shard][-1]:
                self.handle.commit()
                self.handle = None
        except OSError as exc:
            self.fail(f"writing the merged export to {self.directory!r} failed: {exc}")

    def finish(self) -> Optional[str]:
        """Write the index (several shards), remove an earlier export's other files; returns the error."""
        if not self.error and self.next != len(self.plan):
            self.fail(f"merged export: {self.next} of {len(self.plan)} planned tensors arrived")
        if self.error:
            return self.error
        try:
            if len(self.names) > 1:
                index = {"metadata": {"total_size": self.total_size, **self.metadata},
                         "weight_map": {key: self.names[self.shard_of[i]] for i, (key, _, _) in enumerate(self.plan)}}
                text = json.dumps(index, indent=2, sort_keys=True) + "\n"
                write_text(os.path.join(self.directory, INDEX_NAME), text)
            for name in os.listdir(self.directory):  # files of an earlier export with another shard count
                stale = SHARD_PATTERN.fullmatch(name) or name in (SINGLE_NAME, INDEX_NAME)
                if stale and name not in self.files:
                    os.unlink(os.path.join(self.directory, name))
            fsync_dir(self.directory)
        except OSError as exc:
            self.fail(f"writing {INDEX_NAME} to {self.directory!r} failed: {exc}")
        return self.error
