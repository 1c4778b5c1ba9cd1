"""The GGUF tokenizer cache: built from the GGUF once, then read from its folder, and the same tokenizer."""

from __future__ import annotations

import os

import pytest

TEXTS = ["What is 25 plus 11?", "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
         "héllo  wörld\t\n 123456 🙂"]


def test_gguf_tokenizer_is_built_once_then_read_from_the_cache(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import megalora.hf as H
    from megalora.hf.cache import CACHE_ENV, cached_tokenizer, tokenizer_cache_path
    from megalora.hf.models import resolve_files

    try:
        files = resolve_files(H.smollm2_gguf_path())
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    built = cached_tokenizer.__wrapped__(files)  # unwrapped: no in-process memo between the two loads
    folder = tokenizer_cache_path(files)
    assert os.path.dirname(folder) == str(tmp_path) and os.path.isfile(os.path.join(folder, "tokenizer.json"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left

    original = AutoTokenizer.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert not kwargs.get("gguf_file"), "the cached tokenizer was rebuilt from the GGUF file"
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(no_gguf))
    cached = cached_tokenizer.__wrapped__(files)
    assert len(cached) == len(built) and cached.get_vocab() == built.get_vocab()
    assert cached.chat_template == built.chat_template
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(cached, attr) == getattr(built, attr), attr
    assert cached.convert_tokens_to_ids("<|im_end|>") == built.convert_tokens_to_ids("<|im_end|>")
    for text in TEXTS:
        for special in (True, False):
            ids = built.encode(text, add_special_tokens=special)
            assert cached.encode(text, add_special_tokens=special) == ids, (text, special)
            assert cached.decode(ids, skip_special_tokens=True) == built.decode(ids, skip_special_tokens=True)
