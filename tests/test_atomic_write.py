"""Tests of megalora.atomic_write: all-or-nothing files with shareable permissions."""

from __future__ import annotations

import os

import pytest
import torch

from megalora import atomic_write


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _leftovers(directory) -> list:
    return [name for name in os.listdir(directory) if name.endswith(".tmp")]


def test_write_bytes_text_json_replace_with_mode_0644(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    atomic_write.write_bytes(str(path), b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o644  # mkstemp alone would give 0600
    atomic_write.write_text(str(tmp_path / "t.txt"), "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write.write_json(str(tmp_path / "j.json"), {"a": 1}, indent=1)
    assert (tmp_path / "j.json").read_text() == '{\n "a": 1\n}'
    assert _mode(tmp_path / "j.json") == 0o644 and _leftovers(tmp_path) == []


def test_streamed_file_commits_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "shard.bin"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_write.AtomicFile(str(path)) as handle:
            handle.write(b"half")
            raise ValueError("stop")
    assert path.read_bytes() == b"old" and _leftovers(tmp_path) == []
    with atomic_write.AtomicFile(str(path)) as handle:
        handle.write(b"head")
        handle.write(torch.arange(4, dtype=torch.uint8).numpy())  # buffer protocol, as the exporter writes
        assert path.read_bytes() == b"old"  # nothing visible before the commit
    assert path.read_bytes() == b"head\x00\x01\x02\x03" and _mode(path) == 0o644


def test_atomic_path_for_writers_that_take_a_name(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "cache.safetensors"
    with atomic_write.atomic_path(str(path)) as tmp:
        save_file({"w": torch.ones(2)}, tmp)
    assert torch.equal(load_file(str(path))["w"], torch.ones(2)) and _mode(path) == 0o644
    with pytest.raises(RuntimeError):
        with atomic_write.atomic_path(str(path)) as tmp:
            save_file({"w": torch.zeros(2)}, tmp)
            raise RuntimeError("conversion failed")
    assert torch.equal(load_file(str(path))["w"], torch.ones(2)) and _leftovers(tmp_path) == []


def test_write_files_replaces_none_until_all_are_staged(tmp_path, monkeypatch):
    a, b = tmp_path / "weights", tmp_path / "config"
    a.write_bytes(b"old-a")
    b.write_bytes(b"old-b")

    with pytest.raises(TypeError):  # fails while the second file is staged
        atomic_write.write_files([(str(a), b"new-a"), (str(b), object())])
    assert (a.read_bytes(), b.read_bytes()) == (b"old-a", b"old-b") and _leftovers(tmp_path) == []
    order = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(os.path.basename(dst)),
                                                          real_replace(src, dst)))
    atomic_write.write_files([(str(a), b"new-a"), (str(b), b"new-b")])
    assert order == ["weights", "config"] and (a.read_bytes(), b.read_bytes()) == (b"new-a", b"new-b")


def test_remove_stale_temporaries(tmp_path):
    (tmp_path / ".x.json.abc.tmp").write_text("")
    (tmp_path / ".other.abc.tmp").write_text("")
    atomic_write.remove_stale_temporaries(str(tmp_path / "x.json"))
    assert _leftovers(tmp_path) == [".other.abc.tmp"]
