"""``bias="all"`` / ``"lora_only"`` adapters on a megatron-core GPT: saved at TP2xPP2, loaded at TP1.

PEFT saves trained biases with the adapter (``bias="all"``: every ``*.bias``
of the model; ``"lora_only"``: each LoRA layer's ``base_layer.bias``). The
oracle: the TP=1 model's own state-dict keys, filtered by PEFT's function,
give the key set; the biases are moved by layout-invariant noise at TP2xPP2
(column biases sharded, a gated ``linear_fc1``'s in ``[gate_k; up_k]`` blocks,
row biases replicated), and the logits after loading at TP=1 must equal the
saved model's. A load that skipped the biases, or sliced them wrongly, moves
the logits by the noise (0.05), far above the tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import io_utils as U


def _peft_bias_keys(peft_model, mode: str) -> set:
    """The bias keys HF PEFT 0.21 would save for ``peft_model`` at TP=1/PP=1 (names are then global)."""
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    from megalora.layers import LoraLayer

    state = peft_model.state_dict()
    if mode == "all":
        keys = {k for k in state if k.endswith(".bias")}
    else:
        keys = {f"base_model.model.{n}.base_layer.bias" for n, m in peft_model.base_model.model.named_modules()
                if isinstance(m, LoraLayer)} & set(state)
    return {_remove_adapter_name_from_state_dict_key(k, "default") for k in keys}


def _bias_body(root: str, mode: str):
    import megalora
    from megalora.checkpoint import read_adapter_tensors
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    peft = megalora.get_peft_model(U.build(full, tp=2, pp=2), U.lora_config(bias=mode))
    U.perturb(peft, "default")
    saved_logits = U.pipeline_logits(peft.get_base_model())
    path = os.path.join(root, f"{mode}-tp2pp2")
    peft.save_pretrained(path)
    destroy_parallel()

    # World size 1 layout (the 4 ranks are plain replicas).
    loaded = megalora.PeftModel.from_pretrained(U.build(full), path)
    U.assert_close(saved_logits, U.pipeline_logits(loaded.get_base_model()), 1e-5, f"bias={mode}: TP2xPP2 vs TP1")
    expected_keys = _peft_bias_keys(loaded, mode)
    again = os.path.join(root, f"{mode}-tp1")  # collective: global rank 0 writes, all read after
    loaded.save_pretrained(again)
    destroy_parallel()
    file, file_tp1 = read_adapter_tensors(path), read_adapter_tensors(again)
    assert file.keys() == file_tp1.keys(), sorted(file.keys() ^ file_tp1.keys())[:4]
    for key in file:
        assert torch.equal(file[key], file_tp1[key]), f"{key}: TP2xPP2 and TP1 files differ"
    biases = {k for k in file if k.endswith(".bias")}
    assert biases == expected_keys, sorted(biases ^ expected_keys)[:4]
    moved = {k: (file[k] - full[k.removeprefix("base_model.model.").replace(".base_layer", "")]).abs().max().item()
             for k in biases}
    return sorted(biases), min(moved.values())


@pytest.mark.parametrize("mode", ["all", "lora_only"])
def test_bias_adapter_saved_tp2_pp2_loads_at_tp1(dist4, tmp_path, mode):
    results = dist4(_bias_body, str(tmp_path), mode, timeout_s=600)
    biases, moved = results[0]
    assert all(r == results[0] for r in results)
    assert moved > 1e-3, "every saved bias must hold its trained value, not the base model's"
    # Column (gated fc1: two blocks), row and, for "all", norm biases of both stages, with global names.
    layer3 = "base_model.model.decoder.layers.3."
    assert f"{layer3}mlp.linear_fc1.base_layer.bias" in biases
    assert f"{layer3}self_attention.linear_proj.base_layer.bias" in biases
    if mode == "all":
        assert "base_model.model.decoder.final_layernorm.bias" in biases
        assert f"{layer3}input_layernorm.bias" in biases
    else:
        assert all(".base_layer.bias" in k for k in biases)


def test_hf_bridge_names_trained_biases_it_cannot_convert():
    """The HF bridge maps LoRA factors only; a saved model bias gets its own message, not "not a LoRA factor"."""
    from megalora.hf.adapters import _by_module

    key = "base_model.model.decoder.layers.0.mlp.linear_fc1.base_layer.bias"
    with pytest.raises(ValueError, match="bias='none'"):
        _by_module({key: torch.zeros(4)}, "the adapter")
