"""A cache of converted weights, so that a model is converted once per machine.

Loading SmolLM2 from its GGUF file (dequantization through transformers)
takes tens of seconds. The first load converts the model to one safetensors
file of *full* megatron tensors (the TP=1, PP=1 layout, global names, fp32),
with the HF config in its metadata. Every later build, at any TP/PP layout,
reads only its own shards from that file (memory-mapped slices).

Where: ``$MEGALORA_CACHE`` if set, else ``~/.cache/megalora``. The file name
carries a hash of the source files' absolute paths, sizes and modification
times (and of this converter's format version), so an edited or replaced
model is converted again. Files are written atomically (temporary file,
fsync, rename): a crash never leaves a torn cache file behind.

A GGUF file's tokenizer is cached the same way, as a saved fast tokenizer
(``<stem>-<key>-tokenizer/``): transformers rebuilds it from the GGUF
vocabulary in ~7 s of CPU, and reads the saved folder in well under one.

Under ``torch.distributed`` global rank 0 converts while the others wait for
the file; the cache directory must then be one that every rank can read (a
shared file system across nodes, or set ``MEGALORA_CACHE``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

from ..collectives import group_rank
from ..atomic_write import atomic_path, write_text
from .arch import arch_from_hf
from .convert import SafetensorsSource, mcore_state_from_hf
from .models import ModelFiles, clean_hf_config, hf_config_from_dict, load_hf_model

logger = logging.getLogger(__name__)

CACHE_ENV = "MEGALORA_CACHE"
# Bump when the layout of cached files changes, so stale files are not read.
FORMAT = "megalora-mcore-fp32-v1"
# How long other ranks wait for rank 0's conversion, and how old an error
# file may be and still belong to this run.
WAIT_S = 1800.0
STALE_ERROR_S = 120.0


def cache_dir() -> str:
    """``$MEGALORA_CACHE``, else ``~/.cache/megalora``."""
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/megalora"))


def cache_key(files: ModelFiles) -> str:
    """A hash of the source files' paths, sizes and mtimes, and of :data:`FORMAT`."""
    stats = []
    for path in files.weight_files:
        st = os.stat(path)
        stats.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    blob = json.dumps([FORMAT, files.gguf_file, stats], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(files: ModelFiles) -> str:
    """Where the converted weights of ``files`` are (or will be) cached."""
    stem = files.gguf_file[: -len(".gguf")] if files.gguf_file else os.path.basename(files.directory)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "model"
    return os.path.join(cache_dir(), f"{stem}-{cache_key(files)}.safetensors")


def convert_to_cache(files: ModelFiles, path: str) -> None:
    """Load the HF model of ``files``, convert it, and write ``path`` atomically."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    source = os.path.join(files.directory, files.gguf_file) if files.gguf_file else files.directory
    hf_model = load_hf_model(source)
    hf_config = clean_hf_config(hf_model.config)
    arch = arch_from_hf(hf_config)
    state = mcore_state_from_hf(arch, hf_model.state_dict())
    del hf_model
    metadata = {
        "format": FORMAT,
        "hf_config": hf_config.to_json_string(use_diff=False),
        "source": os.path.join(files.directory, files.gguf_file or ""),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    logger.info("converted %s in %.1f s into %s", metadata["source"], time.perf_counter() - start, path)


def _cached_config_json(path: str) -> Optional[dict]:
    """The HF config stored in a cache file's metadata; ``None`` if the file is not in :data:`FORMAT`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return json.loads(metadata["hf_config"]) if metadata.get("format") == FORMAT else None


def open_cached(path: str) -> SafetensorsSource:
    """A :class:`SafetensorsSource` over a cached file, with its HF config."""
    config = _cached_config_json(path)
    if config is None:
        raise ValueError(f"{path} is not a megalora {FORMAT} cache file; delete it and load again")
    hf_config = hf_config_from_dict(config)
    return SafetensorsSource(arch_from_hf(hf_config), hf_config, path)


def cached_config_fields(files: ModelFiles) -> Optional[SimpleNamespace]:
    """The cached model's HF config as plain attributes, or ``None`` on a cache miss.

    For the CLI's parent process, which checks the layout against the model's
    shape before any rank starts: building the config object imports
    transformers' model package (seconds), and the shape needs none of it.
    ``to_json_string(use_diff=False)`` wrote every field under its own name,
    so :func:`~megalora.hf.arch.arch_from_hf` reads the same values from it.
    """
    path = cache_path(files)
    config = _cached_config_json(path) if os.path.isfile(path) else None
    return None if config is None else SimpleNamespace(**config)


def cached_hf_config(files: ModelFiles):
    """The cached model's HF config object (no GGUF quantization fields), or ``None`` on a cache miss."""
    path = cache_path(files)
    return open_cached(path).hf_config if os.path.isfile(path) else None


def _error_path(path: str) -> str:
    return path + ".error"


def cached_source(files: ModelFiles, wait_s: float = WAIT_S) -> SafetensorsSource:
    """The cached weights of ``files``, converting them on a miss.

    Under ``torch.distributed``, global rank 0 converts while the other ranks
    wait for the file to appear; a failure on rank 0 is written next to the
    cache file and raised on every rank. No collective is used: megatron-core
    all-reduces tied embeddings while it builds virtual pipeline chunks, and a
    collective here, between two chunk builds, would interleave with it.

    Raises:
        RuntimeError: If the conversion failed (on any rank), or the file did
            not appear within ``wait_s`` (the cache directory is not shared).
    """
    path = cache_path(files)
    if os.path.isfile(path):
        return open_cached(path)
    if group_rank(None) == 0:
        if os.path.exists(_error_path(path)):
            os.unlink(_error_path(path))
        try:
            convert_to_cache(files, path)
        except Exception as exc:
            message = f"converting {files.directory}/{files.gguf_file or ''} failed: {type(exc).__name__}: {exc}"
            write_text(_error_path(path), message)
            raise
        return open_cached(path)
    started = time.time()
    while not os.path.isfile(path):
        error = _error_path(path)
        # An error file older than this wait is left over from an earlier run.
        if os.path.isfile(error) and os.path.getmtime(error) >= started - STALE_ERROR_S:
            with open(error, encoding="utf-8") as handle:
                raise RuntimeError(f"rank 0 failed: {handle.read()}")
        if time.time() - started > wait_s:
            raise RuntimeError(
                f"the converted weights {path} did not appear within {wait_s:.0f} s: rank 0 converts them; "
                f"set {CACHE_ENV} to a directory that every rank shares"
            )
        time.sleep(0.2)
    return open_cached(path)


def tokenizer_cache_path(files: ModelFiles) -> str:
    """Where the tokenizer of a GGUF ``files`` is (or will be) cached, per transformers version."""
    import transformers

    weights = cache_path(files)[: -len(".safetensors")]
    return f"{weights}-tokenizer-{re.sub(r'[^0-9A-Za-z.]+', '_', transformers.__version__)}"


@functools.lru_cache(maxsize=4)
def cached_tokenizer(files: ModelFiles):
    """The tokenizer of a GGUF ``files``, built from the GGUF once per machine and then read from its cache.

    Any process may build it (only rank 0 loads tokenizers in megalora's jobs);
    the folder is written under a temporary name and renamed, so a reader sees
    all of it or none, and two writers cannot mix their files. An unwritable
    cache directory only costs the rebuild.
    """
    from transformers import AutoTokenizer

    path = tokenizer_cache_path(files)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(files.directory, **files.from_pretrained_kwargs())
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
    except OSError as exc:
        logger.info("not caching the tokenizer of %s: %s", files.gguf_file, exc)
        return tokenizer
    try:
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
    except OSError:  # another process published it first, or the disk is full: the tokenizer in hand is the same
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer
