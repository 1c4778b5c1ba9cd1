"""The instruction task megalora's main job fine-tunes on, and how it is batched."""

from .dataset import Batch, TokenizedSet, eval_microbatches, global_batch_indices, step_microbatches, tokenize
from .tasks import CATEGORIES, Example, make_splits
from .tokenizer import ByteTokenizer, HFChatTokenizer, load_tokenizer

__all__ = [
    "Batch", "ByteTokenizer", "CATEGORIES", "Example", "TokenizedSet", "eval_microbatches",
    "global_batch_indices", "HFChatTokenizer", "load_tokenizer", "make_splits", "step_microbatches", "tokenize",
]
