"""Tests of megalora.cpu_compat: reversible, idempotent, and version-checked.

The checks compare objects by identity against a snapshot of every attribute
of every module and class the layer touches, so a patch that ``disable``
forgets (or one added later without being recorded) makes them fail.
"""

from __future__ import annotations

import pytest
import torch

from megalora import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the layer never patches when CUDA is available")


def _owners() -> list:
    """Every module and class whose attributes the layer replaces."""
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.language_module import language_module
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    from megatron.core.tensor_parallel import mappings
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    return [torch.cuda, mrandom, mrandom.CudaRNGStatesTracker, tutils, fused_softmax,
            schedules, p2p_communication, language_module.LanguageModule,
            moe_utils, token_dispatcher.MoEAlltoAllTokenDispatcher, mappings]


def _snapshot() -> dict:
    return {(id(owner), name): value for owner in _owners() for name, value in vars(owner).items()}


_MISSING = object()  # an attribute that is absent (te_general_gemm without TE) differs from one set to None


def _changed(before: dict, after: dict) -> set:
    return {key for key in before.keys() | after.keys() if before.get(key, _MISSING) is not after.get(key, _MISSING)}


# The attributes the module docstring promises to patch; each must change on enable.
_PROMISED = [
    ("torch.cuda", "current_device"), ("torch.cuda", "synchronize"),
    ("mrandom", "_get_cuda_rng_state"), ("mrandom", "_set_cuda_rng_state"),
    ("tracker", "add"), ("tracker", "fork"),
    ("tutils", "get_default_causal_mask"), ("tutils", "get_sliding_window_causal_mask"),
    ("fused_softmax", "get_default_causal_mask"),
    ("schedules", "forward_backward_no_pipelining"),
    ("schedules", "forward_backward_pipelining_without_interleaving"),
    ("schedules", "forward_backward_pipelining_with_interleaving"),
    ("p2p", "_batched_p2p_ops"), ("LanguageModule", "setup_embeddings_and_output_layer"),
    # Mixture of experts: the router's GEMM choice without TE, the alltoall dispatcher's
    # D2H stream, gloo's missing uneven all-gather / reduce-scatter.
    ("moe_utils", "te_general_gemm"), ("dispatcher", "cuda_dtoh_stream"),
    ("dispatcher", "_maybe_dtoh_and_synchronize"), ("mappings", "_gather_along_first_dim"),
    ("mappings", "_reduce_scatter_along_first_dim"),
]


@pytest.fixture
def compat_off():
    """Runs the test with the layer off, and leaves it as the test found it."""
    was_active = cpu_compat.is_active()
    cpu_compat.disable()
    yield
    cpu_compat.disable()
    if was_active:
        cpu_compat.enable()


def test_disable_restores_every_original(compat_off):
    owners = dict(zip(["torch.cuda", "mrandom", "tracker", "tutils", "fused_softmax",
                       "schedules", "p2p", "LanguageModule", "moe_utils", "dispatcher", "mappings"], _owners()))
    before = _snapshot()
    cpu_compat.enable()
    assert cpu_compat.is_active()
    changed = _changed(before, _snapshot())
    for owner, name in _PROMISED:
        assert (id(owners[owner]), name) in changed, f"{owner}.{name} was not patched"
    cpu_compat.disable()
    assert not cpu_compat.is_active()
    assert _changed(before, _snapshot()) == set()
    assert torch.cuda.current_device is before[(id(torch.cuda), "current_device")]


def test_enable_twice_is_idempotent(compat_off):
    before = _snapshot()
    cpu_compat.enable()
    once = _snapshot()
    cpu_compat.enable()
    assert _changed(once, _snapshot()) == set()
    cpu_compat.disable()  # one disable undoes both
    assert _changed(before, _snapshot()) == set()


def test_enabled_block_changes_behaviour_and_puts_it_back(compat_off):
    from megatron.core.transformer import utils as tutils

    with cpu_compat.enabled():
        mask = tutils.get_default_causal_mask(3)
        assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True]
        assert torch.cuda.current_device() == torch.device("cpu")
    assert not cpu_compat.is_active()
    with pytest.raises((AssertionError, RuntimeError)):  # literal device="cuda" on a CPU build
        tutils.get_default_causal_mask(3)


def test_enabled_block_keeps_a_layer_that_was_on(compat_off):
    cpu_compat.enable()
    with cpu_compat.enabled():
        pass
    assert cpu_compat.is_active()


def test_never_patches_with_cuda(compat_off, monkeypatch):
    current = torch.cuda.current_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_compat.enable()
    assert not cpu_compat.is_active() and torch.cuda.current_device is current


@pytest.mark.parametrize("version, supported", [
    ("0.16.1", True), ("0.16.0", True), ("0.16.2rc1", True),
    ("0.15.3", False), ("0.17.0", False), ("0.160.0", False), ("1.0.0", False),
])
def test_version_check(version, supported):
    message = cpu_compat.check_megatron_version(version)
    if supported:
        assert message is None
    else:
        assert "\n" not in message and version in message and "0.16.x" in message


def test_other_version_warns_once_in_one_line(compat_off, monkeypatch):
    from megatron.core import package_info

    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    with pytest.warns(UserWarning, match=r"written for megatron-core 0\.16\.x but 0\.99\.0"):
        cpu_compat.enable()
    assert cpu_compat.is_active()


def test_missing_site_raises_and_patches_nothing(compat_off, monkeypatch):
    from megatron.core.pipeline_parallel import p2p_communication

    monkeypatch.delattr(p2p_communication, "_p2p_ops")
    before = _snapshot()
    with pytest.raises(RuntimeError, match="_p2p_ops is missing"):
        cpu_compat.enable()
    assert not cpu_compat.is_active() and _changed(before, _snapshot()) == set()
