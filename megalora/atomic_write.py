"""Writing files so that a crash leaves either the old file or the new one.

Every file megalora writes for a user (adapters, configs, merged exports,
converted caches, trainer checkpoints and summaries) goes through here: the
bytes go to a temporary file in the target's directory (``.NAME.XXXX.tmp``,
so the rename never crosses a file system), are fsynced, the file is renamed
over the target with ``os.replace``, and the directory is fsynced so the
rename itself survives a power loss.

Written files get mode ``0644`` (``rw-r--r--``): ``tempfile.mkstemp`` creates
them ``0600``, but adapters, exports and caches are meant to be shared.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

__all__ = ["FILE_MODE", "AtomicFile", "atomic_path", "fsync_dir", "remove_stale_temporaries", "write_bytes",
           "write_files", "write_json", "write_text"]

FILE_MODE = 0o644

# One os.write call at most this many bytes: large writes stay interruptible
# and tests can stop a save half-way by patching os.write.
_WRITE_CHUNK = 64 << 20


def fsync_dir(directory: str) -> None:
    """Persists the renames done in ``directory`` (no-op where directories cannot be opened)."""
    if os.name == "nt":
        return
    dir_fd = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(path: str) -> None:
    """Removes the temporary files that killed writes of ``path`` left next to it."""
    directory, name = os.path.split(os.fspath(path))
    for stale in glob.glob(os.path.join(glob.escape(directory or "."), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


class AtomicFile:
    """A file written under a temporary name, then renamed over ``path``.

    ``commit()`` publishes it, ``abort()`` throws it away; as a context
    manager it commits on success and aborts on an exception. For writers
    that emit one file in many calls (a streamed export shard).

    Args:
        path: The file to (re)place.
        sync_dir: Whether ``commit`` also fsyncs the directory; False when the
            caller renames several files and syncs the directory once.
    """

    def __init__(self, path: str, *, sync_dir: bool = True):
        self.path = os.fspath(path)
        self.directory = os.path.dirname(self.path) or "."
        self.sync_dir = sync_dir
        self.fd, self.tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{os.path.basename(self.path)}.",
                                             suffix=".tmp")
        try:
            os.fchmod(self.fd, FILE_MODE)
        except BaseException:
            self.abort()
            raise

    def write(self, data) -> None:
        """Appends ``data`` (anything with the buffer protocol: bytes, a uint8 numpy array)."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _WRITE_CHUNK):
            chunk = view[start:start + _WRITE_CHUNK]
            while chunk:
                chunk = chunk[os.write(self.fd, chunk):]

    def sync(self) -> None:
        """Flushes the temporary file to disk and closes it; the target is untouched."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self) -> None:
        """Syncs the file and renames it over the target."""
        self.sync()
        os.replace(self.tmp, self.path)
        self.tmp = None
        if self.sync_dir:
            fsync_dir(self.directory)

    def abort(self) -> None:
        """Closes and removes the temporary file; the target is untouched."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            self.tmp = None

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write by name; it replaces ``path`` when the block succeeds.

    For writers that only take a file name (``safetensors.torch.save_file``).
    The file is removed again when the block raises.
    """
    staged = AtomicFile(path)
    os.close(staged.fd)  # the writer opens the name itself; fsync reopens it
    staged.fd = None
    try:
        yield staged.tmp
        staged.fd = os.open(staged.tmp, os.O_RDONLY)
        os.fchmod(staged.fd, FILE_MODE)  # the writer may have recreated the file with its own mode
    except BaseException:
        staged.abort()
        raise
    staged.commit()


def write_bytes(path: str, data) -> None:
    """Writes ``data`` to ``path`` atomically."""
    with AtomicFile(path) as handle:
        handle.write(data)


def write_text(path: str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, **dumps_kwargs: Any) -> None:
    """Writes ``json.dumps(obj, **dumps_kwargs)`` to ``path`` atomically."""
    write_text(path, json.dumps(obj, **dumps_kwargs))


def write_files(files: Sequence[tuple[str, bytes]]) -> None:
    """Writes several files so that none is replaced before all are complete on disk.

    Every file is staged and synced first; then they are renamed in the order
    given (put the one readers check last, e.g. a config after its weights),
    and each directory is synced once.
    """
    staged: list[AtomicFile] = []
    try:
        for path, data in files:
            staged.append(AtomicFile(path, sync_dir=False))
            staged[-1].write(data)
            staged[-1].sync()
    except BaseException:
        for handle in staged:
            handle.abort()
        raise
    for handle in staged:
        handle.commit()
    for directory in dict.fromkeys(handle.directory for handle in staged):
        fsync_dir(directory)
