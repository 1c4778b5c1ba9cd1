"""``layer_replication``: PEFT's mapping on HF models, and the same stack at every pipeline layout.

* HF Llama: the stack, ``layer_idx``, ``num_hidden_layers`` and the adapter keys
  match HF PEFT's own ``replicate_layers``, and so does the output given the
  same LoRA weights.
* megatron-core: ``[[0, 4], [2, 5]]`` on 5 layers trains the same at PP=1 and
  PP=2 (where copies need the other stage's base weights), ``[[0, 4], [1, 3]]``
  the same at PP=1 and PP=2 x VPP=2; copies on one stage share storage.
* Merging gives each copy its own weights; unloading shares them again.
* Bad ranges fail on every rank before any weight moves.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests import gpt_utils as G
from tests.test_targeting import (
    adapted_layers,
    assert_close_dicts,
    assert_losses_close,
    gathered_adapter,
    last_stage_losses,
    train_data,
)

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def _lora(layer_map, **overrides):
    import megalora

    kwargs = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0,
                  layer_replication=layer_map)
    kwargs.update(overrides)
    return megalora.LoraConfig(**kwargs)


# ---------------------------------------------------------------------- HF models


def _tiny_llama(num_layers=5):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def _weight_ptr(layer):
    attn = layer.self_attn.q_proj
    return getattr(attn, "base_layer", attn).weight.data_ptr()


def test_hf_llama_matches_peft_replicate_layers():
    import peft

    import megalora

    base = _tiny_llama()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    ours_before = [_weight_ptr(l) for l in ours.model.layers]
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  layer_replication=[[0, 4], [2, 5]])
    p = peft.get_peft_model(theirs, peft.LoraConfig(**kwargs))
    q = megalora.get_peft_model(ours, megalora.LoraConfig(**kwargs))
    p_layers, q_layers = p.base_model.model.model.layers, q.base_model.model.model.layers

    # The same stack (sources seen through shared storage), cache indices and config.
    assert len(q_layers) == len(p_layers) == 7
    p_ptrs, q_ptrs = [_weight_ptr(l) for l in p_layers], [_weight_ptr(l) for l in q_layers]
    assert [p_ptrs.index(x) for x in p_ptrs] == [q_ptrs.index(x) for x in q_ptrs] == [0, 1, 2, 3, 2, 3, 6]
    assert q_ptrs == [ours_before[s] for s in (0, 1, 2, 3, 2, 3, 4)]
    assert [l.self_attn.layer_idx for l in q_layers] == [l.self_attn.layer_idx for l in p_layers] == list(range(7))
    assert q.base_model.model.config.num_hidden_layers == p.base_model.model.config.num_hidden_layers == 7
    assert len({id(l) for l in q_layers}) == 7 and len({id(l.self_attn) for l in q_layers}) == 7

    p_state = {k: v for k, v in p.state_dict().items() if "lora_" in k}
    q_state = {k: v for k, v in q.state_dict().items() if "lora_" in k}
    assert p_state.keys() == q_state.keys() and len(q_state) == 7 * 3 * 2
    q.load_state_dict(p_state, strict=False)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = p(tokens).logits
        unmerged = q(tokens).logits
        torch.testing.assert_close(unmerged, expected, rtol=0, atol=0)
        with q.disable_adapter():
            plain = q(tokens).logits

        # Copy-on-merge: each copy gets its own merged weight; unmerge shares again.
        q.merge_adapter()
        merged_ptrs = [_weight_ptr(l) for l in q_layers]
        assert len(set(merged_ptrs)) == 7
        torch.testing.assert_close(q(tokens).logits, unmerged, rtol=1e-5, atol=1e-5)
        q.unmerge_adapter()
        # (A plain nn.Linear merge rebinds .data, so only the shared copies keep their pointers.)
        shared = lambda ptrs: [ptrs[i] for i in (2, 3, 4, 5)]  # noqa: E731
        assert shared([_weight_ptr(l) for l in q_layers]) == shared(q_ptrs)

        q.merge_adapter()
        restored = q.unload()
        assert shared([l.self_attn.q_proj.weight.data_ptr() for l in restored.model.layers]) == shared(q_ptrs)
        torch.testing.assert_close(restored(tokens).logits, plain, rtol=1e-5, atol=1e-6)

    # merge_and_unload on a fresh copy: merged output equals the unmerged one.
    again = megalora.get_peft_model(copy.deepcopy(base), megalora.LoraConfig(**kwargs))
    again.load_state_dict(p_state, strict=False)
    with torch.no_grad():
        merged_model = again.merge_and_unload()
        layers = merged_model.model.layers
        assert len({l.self_attn.q_proj.weight.data_ptr() for l in layers}) == 7
        assert not torch.equal(layers[2].self_attn.q_proj.weight, layers[4].self_attn.q_proj.weight)
        torch.testing.assert_close(merged_model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_hf_adapter_round_trips_through_peft(tmp_path):
    import peft

    import megalora

    base = _tiny_llama()
    config = megalora.LoraConfig(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights=False,
                                 layer_replication=[[0, 3], [1, 5]])
    ours = megalora.get_peft_model(copy.deepcopy(base), config)
    ours.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    back = megalora.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ours(tokens).logits
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(back(tokens).logits, expected, rtol=0, atol=0)
    assert len(back.base_model.model.model.layers) == 7


def test_hf_bad_ranges_name_the_field():
    import megalora

    with pytest.raises(ValueError, match=r"layer_replication.*\[0, 6\).*out of bounds.*5 layers"):
        megalora.get_peft_model(_tiny_llama(), megalora.LoraConfig(target_modules=["q_proj"],
                                                                    layer_replication=[[0, 6]]))
    for bad in ([[2, 2]], [[3, 1]], [[-1, 2]], [[0, 1, 2]]):
        with pytest.raises(ValueError, match="layer_replication"):
            megalora.LoraConfig(target_modules=["q_proj"], layer_replication=bad)
    with pytest.raises(ValueError, match="no layer stack found"):
        megalora.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                                megalora.LoraConfig(target_modules=["0"], layer_replication=[[0, 1]]))


def test_second_adapter_must_repeat_the_same_replication():
    import megalora

    model = megalora.get_peft_model(_tiny_llama(), megalora.LoraConfig(target_modules=["q_proj"],
                                                                      layer_replication=[[0, 4], [2, 5]]))
    model.add_adapter("same", megalora.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 4], [2, 5]]))
    model.add_adapter("none", megalora.LoraConfig(target_modules=["v_proj"]))
    assert len(model.base_model.model.model.layers) == 7
    with pytest.raises(ValueError, match="layer_replication.*differs"):
        model.add_adapter("other", megalora.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 5]]))
    plain = megalora.get_peft_model(_tiny_llama(), megalora.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="layer_replication must be set on the first adapter"):
        plain.add_adapter("late", megalora.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 5]]))


# ---------------------------------------------------------------------- megatron-core


def _megatron(tp=1, pp=1, vpp=None, num_layers=5, first_stage_layers=None, gated=False, full=None):
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           virtual_pipeline_model_parallel_size=vpp, seed=1234)
    config = G.gpt_config(tp=tp, pp=pp, vpp=vpp, num_layers=num_layers, first_stage_layers=first_stage_layers,
                          gated=gated)
    chunks = G.build_stage(config, rope=True)
    if full is not None:
        for chunk in chunks:
            G.load_full_state(chunk, full, gated=gated)
    return config, chunks


def _fc1_ptrs(chunks) -> dict:
    """``{layer_number: data_ptr of linear_fc1's base weight}`` over this rank's chunks."""
    out = {}
    for chunk in chunks:
        for layer in chunk.decoder.layers:
            fc1 = layer.mlp.linear_fc1
            out[layer.layer_number] = getattr(fc1, "base_layer", fc1).weight.data_ptr()
    return out


def _reference(layer_map, num_layers, gated=False):
    """PP=1 with replication: trains, and checks sharing, merging and unloading on the way."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    config, chunks = _megatron(num_layers=num_layers, gated=gated)
    full = {k: v.detach().clone() for k, v in chunks[0].named_parameters()}
    peft = megalora.get_peft_model(chunks[0], _lora(layer_map))
    sources = peft.base_model.replication["sources"]
    ptrs = _fc1_ptrs(chunks)
    for i, s in enumerate(sources):  # every copy shares storage with the first copy of its source
        assert ptrs[i + 1] == ptrs[sources.index(s) + 1], (i, s)
    assert config.num_layers == len(sources) and chunks[0].decoder.num_layers_per_pipeline_rank == len(sources)
    out = dict(full=full, sources=sources, init=gathered_adapter(peft), layers=adapted_layers(peft))
    out["losses"] = G.pipeline_train(chunks, train_data())
    assert out["losses"][-1] < out["losses"][0], "training did not lower the loss"
    out["final"] = gathered_adapter(peft)

    eval_steps = G.pipeline_steps(1, seed=7)
    unmerged = G.pipeline_train(chunks, eval_steps, forward_only=True)[0]
    with torch.no_grad():
        peft.merge_adapter()
        assert len(set(_fc1_ptrs(chunks).values())) == len(sources), "merged copies must not share storage"
        merged = G.pipeline_train(chunks, eval_steps, forward_only=True)[0]
        peft.unmerge_adapter()
        assert _fc1_ptrs(chunks) == ptrs, "unmerge must share the base weights again"
        base_model = peft.merge_and_unload()
    unloaded = G.pipeline_train([base_model], eval_steps, forward_only=True)[0]
    layers = base_model.decoder.layers
    dup = [i for i, s in enumerate(sources) if sources.index(s) != i][0]
    first = sources.index(sources[dup])
    assert not torch.equal(layers[dup].mlp.linear_fc1.weight, layers[first].mlp.linear_fc1.weight)
    out["merge"] = (unmerged, merged, unloaded)
    destroy_parallel()
    return out


def _check_merge(out):
    unmerged, merged, unloaded = out["merge"]
    assert abs(merged - unmerged) <= 1e-5 * abs(unmerged) and abs(unloaded - unmerged) <= 1e-5 * abs(unmerged)


def _replicate_pp_body(layer_map, num_layers, layout):
    import megalora
    from megalora.testing.collective_counter import count_collectives

    ref = _reference(layer_map, num_layers, gated=layout.get("gated", False))
    _check_merge(ref)
    config, chunks = _megatron(full=ref["full"], num_layers=num_layers, **layout)
    before = _fc1_ptrs(chunks)
    with count_collectives() as log:
        peft = megalora.get_peft_model(chunks if layout.get("vpp") else chunks[0], _lora(layer_map))
    summary = peft.base_model.replication
    assert summary["sources"] == ref["sources"]
    after = _fc1_ptrs(chunks)

    # Local sources keep their storage; copies of one source on this stage share it.
    from megatron.core import parallel_state as ps

    stage, numbers = ps.get_pipeline_model_parallel_rank(), sorted(after)
    originals = {n - 1: p for n, p in before.items()}
    for n in numbers:
        s = ref["sources"][n - 1]
        if s in originals:
            assert after[n] == originals[s], f"layer {n} (copy of local {s}) does not share its storage"
        else:
            assert s in summary["received"]
        twins = [m for m in numbers if ref["sources"][m - 1] == s]
        assert after[n] == after[twins[0]]
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:  # received weights are this TP rank's shard of the source layer's
        for layer in chunk.decoder.layers:
            s = ref["sources"][layer.layer_number - 1]
            got = layer.mlp.linear_fc1.base_layer.weight
            full = ref["full"][f"decoder.layers.{s}.mlp.linear_fc1.weight"]
            expected = G._spec_for("linear_fc1", got, layout.get("gated", False)).local(full, tp_rank, tp_size)
            assert torch.equal(got, expected), f"layer {layer.layer_number} has not layer {s}'s weights"
    # Megatron's own bookkeeping follows the new stack.
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    for v, chunk in enumerate(chunks):
        vp_stage = v if layout.get("vpp") else None
        offset = get_transformer_layer_offset(config, vp_stage)
        assert [l.layer_number for l in chunk.decoder.layers] == list(
            range(offset + 1, offset + 1 + len(chunk.decoder.layers)))
        assert chunk.decoder.num_layers_per_pipeline_rank == len(chunk.decoder.layers)
        # megatron's dist-checkpoint view stacks the layers at their new global index.
        for key, value in chunk.sharded_state_dict().items():
            if key.endswith("input_layernorm.weight"):
                index = int(key.split(".")[2])
                number = chunk.decoder.layers[index].layer_number
                assert (value.global_offset[0], value.global_shape[0]) == (number - 1, len(ref["sources"])), key
    assert config.num_layers == len(ref["sources"])

    assert adapted_layers(peft) == ref["layers"]
    assert_close_dicts(ref["init"], gathered_adapter(peft), 0.0, "init")
    losses = last_stage_losses(G.pipeline_train(list(peft), train_data()))
    assert_losses_close(ref["losses"], losses, f"replication {layer_map} at {layout}")
    assert_close_dicts(ref["final"], gathered_adapter(peft), 1e-5, "LoRA weights after 5 Adam steps")
    from megalora.layers import LoraLayer

    per_chunk = [sum(isinstance(m, LoraLayer) for m in c.modules()) for c in chunks]
    return stage, summary["counts"], summary["received"], per_chunk, dict(log.calls)


def test_replication_pp2_matches_pp1(dist2):
    results = dist2(_replicate_pp_body, [[0, 4], [2, 5]], 5, dict(pp=2, first_stage_layers=3), timeout_s=600)
    for stage, counts, received, per_chunk, calls in results:
        assert counts == [[4], [3]]  # 7 layers, the extra one on the first stage
        # Stage 0 holds original layers 0-2 and needs 3; stage 1 holds 3-4 and needs 2.
        assert received == ([3] if stage == 0 else [2])
        assert calls.get("send") == 1 and calls.get("recv") == 1, calls


def test_replication_vpp2_matches_pp1(dist2):
    # 4 layers at PP=2 x VPP=2: stage 0 holds 0 and 2, stage 1 holds 1 and 3. The new stack
    # 0 1 2 3 1 2 splits [2, 2, 1, 1] over the virtual stages: stage 0 gets 0 1 | 1 (1 is
    # remote, received once, used twice), stage 1 gets 2 3 | 2.
    results = dist2(_replicate_pp_body, [[0, 4], [1, 3]], 4, dict(pp=2, vpp=2), timeout_s=600)
    for stage, counts, received, per_chunk, calls in results:
        assert counts == [[2, 1], [2, 1]]
        assert received == ([1] if stage == 0 else [2])
        assert calls.get("send") == 1 and calls.get("recv") == 1, calls
        assert per_chunk == [2 * len(TARGETS), len(TARGETS)]


def test_replication_tp2_pp2_matches_world_size_1(dist4):
    results = dist4(_replicate_pp_body, [[0, 4], [2, 5]], 5, dict(tp=2, pp=2, first_stage_layers=3, gated=True),
                    timeout_s=600)
    for stage, counts, received, per_chunk, calls in results:
        assert counts == [[4], [3]] and received == ([3] if stage == 0 else [2])
        assert calls.get("send") == 1 and calls.get("recv") == 1, calls


def _bad_ranges_body(layer_map):
    import megalora
    from megalora.testing.collective_counter import count_collectives

    _, chunks = _megatron(pp=2, num_layers=5, first_stage_layers=3)
    numbers = [l.layer_number for l in chunks[0].decoder.layers]
    with count_collectives() as log:
        with pytest.raises(ValueError) as info:
            megalora.get_peft_model(chunks[0], _lora(layer_map))
    # Nothing moved, and the model is untouched.
    assert not log.calls["send"] and not log.calls["recv"]
    assert [l.layer_number for l in chunks[0].decoder.layers] == numbers
    assert chunks[0].config.num_layers == 5
    return str(info.value)


@pytest.mark.parametrize("layer_map", [[[0, 6]], [[0, 4], [4, 7]]], ids=["end-past-stack", "second-range"])
def test_bad_ranges_fail_on_every_rank(dist2, layer_map):
    messages = dist2(_bad_ranges_body, layer_map)
    assert messages[0] == messages[1]
    assert "layer_replication" in messages[0] and "out of bounds" in messages[0] and "5 layers" in messages[0]
