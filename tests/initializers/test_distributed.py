"""Base-weight inits on a real megatron-core GPT: every layout gives world size 1's result.

One launch on 2 gloo ranks builds the same gated GPT (biases, SwiGLU fc1 whose
TP shards are ``[gate_k; up_k]``) at TP=1 (so DP=2: the decompositions are
dealt to both DP ranks), TP=2 and PP=2, and for each of pissa,
pissa_niter_2, olora and loftq checks:

* the gathered factors and rewritten base weights equal TP=1's (the same
  decomposition of the same full weight, computed on one owner rank);
* the loss at init equals the base model's (LoftQ changes the model on purpose);
* the losses of 5 Adam steps equal TP=1's within 1e-4;
* ``export_merged`` right after init writes the original weights (PiSSA),
  and after training TP=2's merged export equals TP=1's;
* PEFT's conversion (``path_initial_model_for_weight_conversion``) writes the
  same rank-2r adapter at every layout, and the original weight plus its
  ``s·B'@A'`` is the merged export;
* an adapter saved at TP=2 and loaded at PP=2 with ``from_pretrained``
  (which re-runs the init on the original base, as PEFT does), or as an
  adapter-only dist checkpoint into a fresh PiSSA model, gives the same loss;
* ``layer_replication`` copies (on one stage at TP=2, across stages at PP=2)
  keep their own residuals: the loss at init is the replicated base model's,
  also after merge/unmerge.
"""

from __future__ import annotations

import torch

from tests import gpt_utils as G
from tests import io_utils as U

INITS = ("pissa", "pissa_niter_2", "olora", "loftq")
LAYOUTS = {"tp1": dict(tp=1), "tp2": dict(tp=2), "pp2": dict(pp=2)}
# Losses of a 2-layer fp32 GPT agree to ~1e-6 across layouts (different reduction orders); 1e-4 is
# the bound, still far below what a wrong factor or residual shard changes (> 1e-2).
LOSS_TOL = 1e-4


def _config(init, **extra):
    kw = dict(loftq_config={"loftq_bits": 4, "loftq_iter": 2}) if init == "loftq" else {}
    return U.lora_config(init_lora_weights=init, lora_alpha=4 if init == "loftq" else 8, **kw, **extra)


def _loss(chunks, steps) -> float:
    from megalora.collectives import all_gather_objects

    out = G.pipeline_train(chunks, steps, forward_only=True)[0]
    return next(v for v in all_gather_objects(out) if v is not None)


def _losses(chunks, steps) -> list:
    from megalora.collectives import all_gather_objects

    out = G.pipeline_train(chunks, steps)
    return next(v for v in all_gather_objects(out) if v[0] is not None)


def _base_weights(peft) -> dict:
    """Collective: every LoRA layer's full base weight, by global name."""
    from megalora.initializers.distributed import base_weight_spec
    from megalora.sharding import gather_full

    out = {}
    for _, layer in peft.base_model.lora_layers():
        out[layer.global_name] = gather_full(layer.base_weight_oi().detach(), base_weight_spec(layer), layer.tp_group)
    return U.everywhere(out)


def _exported(peft, directory) -> dict:
    import torch.distributed as dist
    from safetensors.torch import load_file

    import megalora

    megalora.export_merged(peft, directory, progressbar=False)
    dist.barrier()
    return load_file(f"{directory}/model.safetensors")


def _layouts_body(tmp: str):
    import torch.distributed as dist

    import megalora
    from megalora.checkpoint import read_adapter_tensors
    from megalora.dist_checkpoint import load_adapter_dist_checkpoint, save_adapter_dist_checkpoint
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights(num_layers=2)
    init_steps, train_steps = G.pipeline_steps(1, seed=9), G.pipeline_steps(5)
    res = {}
    for layout, kw in LAYOUTS.items():
        for init in INITS:
            model = [U.build(full, num_layers=2, **kw)]
            base_loss = _loss(model, init_steps)
            peft = megalora.get_peft_model(model, _config(init), seed=5)
            r = res[layout, init] = dict(factors=U.gathered(peft), base=_base_weights(peft))
            r["init_loss"], r["base_loss"] = _loss(model, init_steps), base_loss
            if init == "pissa" and layout == "tp2":
                r["export_init"] = _exported(peft, f"{tmp}/init")
            if init == "pissa":
                peft.save_pretrained(f"{tmp}/{layout}_initial")
            r["losses"] = _losses(model, train_steps)
            if init == "pissa":
                r["export"] = _exported(peft, f"{tmp}/{layout}")
                peft.save_pretrained(f"{tmp}/{layout}_lora", path_initial_model_for_weight_conversion=f"{tmp}/{layout}_initial")
                dist.barrier()
                r["converted"] = read_adapter_tensors(f"{tmp}/{layout}_lora")
                if layout == "tp2":
                    peft.save_pretrained(f"{tmp}/adapter")
                    save_adapter_dist_checkpoint(peft, f"{tmp}/dist_ckpt")
                    r["trained_loss"] = _loss(model, init_steps)
            destroy_parallel()
    # Reload at PP=2: from_pretrained re-runs PiSSA on the original base, then loads the trained factors;
    # so does a fresh PiSSA model that loads the adapter-only dist checkpoint.
    model = [U.build(full, num_layers=2, pp=2)]
    megalora.PeftModel.from_pretrained(model, f"{tmp}/adapter")
    reloaded = [_loss(model, init_steps)]
    destroy_parallel()
    model = [U.build(full, num_layers=2, pp=2)]
    load_adapter_dist_checkpoint(megalora.get_peft_model(model, _config("pissa"), seed=5), f"{tmp}/dist_ckpt")
    reloaded.append(_loss(model, init_steps))
    destroy_parallel()
    replication = {layout: _replication_case(full, init_steps, **kw) for layout, kw in LAYOUTS.items() if layout != "tp1"}
    dist.barrier()
    return res, reloaded, replication, full


def _replication_case(full, steps, **layout):
    """Loss of layers [0, 1, 1] with init True (B = 0), and with PiSSA before/after merge and unmerge."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    out = {}
    for init in (True, "pissa"):
        model = [U.build(full, num_layers=2, **layout)]
        peft = megalora.get_peft_model(model, _config(init, layer_replication=[[0, 2], [1, 2]]), seed=5)
        out[init] = _loss(model, steps)
        if init == "pissa":
            peft.merge_adapter()
            out["merged"] = _loss(model, steps)
            peft.unmerge_adapter()
            out["unmerged"] = _loss(model, steps)
        destroy_parallel()
    return out


def test_layouts_match_world_size_one(dist2, tmp_path):
    res, reloaded, replication, full = dist2(_layouts_body, str(tmp_path))[0]
    for init in INITS:
        ref = res["tp1", init]
        if init != "loftq":
            assert abs(ref["init_loss"] - ref["base_loss"]) < 1e-5, (init, ref["init_loss"], ref["base_loss"])
        else:
            assert abs(ref["init_loss"] - ref["base_loss"]) > 1e-4, "LoftQ quantizes the base"
        for layout in ("tp2", "pp2"):
            got = res[layout, init]
            for key in ref["factors"]:
                U.assert_close(got["factors"][key], ref["factors"][key], 1e-5, f"{init} {layout} {key}")
            for key in ref["base"]:
                U.assert_close(got["base"][key], ref["base"][key], 1e-6, f"{init} {layout} base {key}")
            assert abs(got["init_loss"] - ref["init_loss"]) < 1e-5, (init, layout)
            diffs = [abs(a - b) for a, b in zip(got["losses"], ref["losses"])]
            assert max(diffs) < LOSS_TOL, (init, layout, got["losses"], ref["losses"])
        assert ref["losses"][-1] < ref["losses"][0], "training moved"
    # Right after init the merged model is the original one (W_res + s·B@A = W, fp32 rounding).
    for key, value in res["tp2", "pissa"]["export_init"].items():
        U.assert_close(value, full[key], 1e-5, f"merged export at init {key}")
    for key, value in res["tp2", "pissa"]["export"].items():
        U.assert_close(value, res["tp1", "pissa"]["export"][key], 1e-5, f"merged export after training {key}")
    # PEFT's conversion at every layout: the same rank-2r adapter, and original + s·B'@A' = the merged export.
    converted = res["tp1", "pissa"]["converted"]
    for layout in ("tp2", "pp2"):
        for key, value in res[layout, "pissa"]["converted"].items():
            U.assert_close(value, converted[key], 1e-5, f"converted {layout} {key}")
    for key, a in converted.items():
        if key.endswith("lora_A.weight"):
            assert a.shape[0] == 8, "r doubled"
            name = key[len("base_model.model."):-len(".lora_A.weight")] + ".weight"
            b = converted[key.replace("lora_A", "lora_B")]
            expected = full[name] + 2.0 * (b @ a)  # scaling alpha/r = 8/4, kept by the conversion
            U.assert_close(res["tp1", "pissa"]["export"][name], expected, 1e-5, f"original + converted delta {name}")
    for loss in reloaded:  # from_pretrained, then the dist checkpoint
        assert abs(loss - res["tp2", "pissa"]["trained_loss"]) < 1e-5, (reloaded, res["tp2", "pissa"]["trained_loss"])
    for layout, losses in replication.items():
        for key in ("pissa", "merged", "unmerged"):
            assert abs(losses[key] - losses[True]) < 1e-5, (layout, key, losses)


def _failure_body():
    """Two plain layers held by both ranks (one job each); the decomposition of one fails on its owner."""
    import torch.distributed as dist
    from torch import nn

    import megalora
    from megalora.initializers.distributed import Decomposition, init_from_full_weights

    torch.manual_seed(0)
    peft = megalora.get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)),
                                   megalora.LoraConfig(r=2, target_modules=["0", "1"]))
    jobs = [(layer, "default") for _, layer in peft.base_model.lora_layers()]

    def decompose(layer, adapter, weight):
        if layer.global_name == "1":
            raise ArithmeticError("planted")
        return Decomposition(weight[:2], weight[:, :2], weight)

    try:
        init_from_full_weights(jobs, decompose)
    except Exception as exc:  # noqa: BLE001
        return dist.get_rank(), type(exc).__name__, str(exc)
    return dist.get_rank(), None, None


def test_a_failed_decomposition_raises_on_every_rank_without_hanging(dist2):
    got = dist2(_failure_body)
    kinds = sorted(kind for _, kind, _ in got)
    assert kinds == ["ArithmeticError", "RuntimeError"], got
    assert any("failed on its owner, global rank" in str(msg) for _, _, msg in got), got


def _rank_too_big_body():
    from torch import nn

    import megalora

    try:
        megalora.get_peft_model(nn.Sequential(nn.Linear(8, 4)),
                                megalora.LoraConfig(r=6, target_modules=["0"], init_lora_weights="pissa"))
    except ValueError as exc:
        return str(exc)
    return None


def test_rank_above_the_weight_rank_is_refused_on_every_rank(dist2):
    for message in dist2(_rank_too_big_body):
        assert message and "needs r <= min(in_features, out_features) = 4" in message, message
