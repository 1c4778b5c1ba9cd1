"""QALoRA under model parallelism: TP=2, TP=2+SP and PP=2 against world size 1, merge at TP=2, the group check.

TP=2 x PP=2 runs in ``test_embedding_parallel.py`` (one 4-rank launch for both features).

The GPT of :mod:`tests.gpt_utils` has ``linear_proj`` (64 inputs) and
``linear_fc2`` (96) as row-parallel layers, so at TP=2 with
``qalora_group_size=16`` each rank pools 2 (resp. 3) whole groups of its
input shard while the ×n_groups factor uses the full layer's count; A is
split along the pooled dimension. One 2-rank launch checks every case.
"""

from __future__ import annotations

import pytest
import torch

from tests import gpt_utils as G
from tests.layers.test_parallel import _build, _oracle_body

QA = {"use_qalora": True, "qalora_group_size": 16}


def _qalora_body():
    from megalora.parallel_start import destroy_parallel

    # Same tolerances as every TP oracle (test_parallel): A and B are drawn in
    # full and sliced (bit-equal init); only the summation order of the
    # sharded reductions differs, ~1e-7 relative per step.
    _oracle_body(False, False, dict(QA))
    destroy_parallel()
    _oracle_body(True, True, dict(QA, lora_dropout=0.0, use_rslora=True))
    destroy_parallel()

    # Gradients too (Adam would hide a uniformly mis-scaled replicated factor's gradient).
    from tests.layers.test_embedding_parallel import assert_grads_close, lora_grads

    ref, full = _build(1, False, True, **QA)
    G.train(ref, G.batches(2))
    ref_grads = lora_grads(ref)
    destroy_parallel()
    par, _ = _build(2, True, True, full=full, **QA)
    G.train(par, G.batches(2))
    assert_grads_close(ref_grads, lora_grads(par), "QALoRA TP=2+SP")
    destroy_parallel()

    model, _ = _build(2, False, True, **QA)
    G.train(model, G.batches(2))
    tokens = G.batches(1, seed=9)[0][0]
    model.eval()
    with torch.no_grad():
        unmerged = G.logits(model, tokens)
        model.merge_adapter()
        merged = (G.logits(model, tokens) - unmerged).abs().max().item()
        model.unmerge_adapter()
        again = (G.logits(model, tokens) - unmerged).abs().max().item()
    destroy_parallel()

    # PP=2 against PP=1 (global names, both stages adapted).
    from tests import test_targeting as T

    T._oracle_body(dict(pp=2), dict(QA))
    destroy_parallel()

    # 96 / 2 = 48 inputs per rank of linear_fc2 is not a multiple of 32: every rank
    # raises the same one-line error (layer 1's fc2 and 0's alike), nothing hangs.
    with pytest.raises(ValueError) as info:
        _build(2, False, False, use_qalora=True, qalora_group_size=32)
    destroy_parallel()
    return merged, again, str(info.value)


def test_qalora_tp2_and_sp_match_tp1(dist2):
    for merged, again, error in dist2(_qalora_body):
        # Merged vs unmerged logits: fp32 rounding of the reordered sums (logits ~1);
        # after unmerge, W + ΔW - ΔW leaves one rounding of ΔW per weight (measured 1.2e-6).
        assert merged < 1e-5 and again < 1e-5, (merged, again)
        assert "qalora_group_size=32" in error and "in_features/TP = 96/2 = 48" in error, error
        assert "use a TP size in [1, 3]" in error, error
