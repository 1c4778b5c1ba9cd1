"""add_weighted_adapter under tensor parallelism: TP=2 gives TP=1's adapter, bit for bit.

The plain-layer PEFT oracle lives in tests/test_merge.py. Here one
body on 2 ranks builds the same model and adapters (moved off their init by
layout-invariant noise) at TP=1 and at TP=2 (gated fc1 included), runs every
combination type, and compares the gathered results exactly. At TP=2 the two
ranks seed their global RNG differently before the DARE types: the masks must
still be the same on both ranks (replicated factors stay identical) and equal
TP=1's, because every rank takes its TP group's rank-0 RNG state first.
"""

from __future__ import annotations

import torch

from tests import io_utils as U

TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
         "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd"]
# The linear family needs equal ranks; cat and the svd family also take a third adapter of another r.
SAME_RANK = (["default", "b"], [0.7, -0.4])
MIXED = (["default", "b", "c"], [0.7, -0.4, 0.5])
EXTRA = {
    "b": dict(lora_alpha=4),
    "c": dict(r=2, lora_alpha=2, target_modules=["linear_fc1", "linear_proj"]),
}


def _case(kind: str):
    adapters, weights = MIXED if kind in ("svd", "cat") or kind.endswith("_svd") else SAME_RANK
    kwargs = dict(combination_type=kind)
    if kind not in ("svd", "linear", "cat"):
        kwargs["density"] = 0.5
    return adapters, weights, kwargs


def _replicas_identical(peft, adapter: str) -> bool:
    """Collective: whether each replicated factor of ``adapter`` is the same on every TP rank."""
    import torch.distributed as dist

    same = True
    for _, layer in peft.base_model.lora_layers():
        if adapter not in layer.lora_A:
            continue
        factor = layer.lora_B[adapter] if layer.a_spec.sharded else layer.lora_A[adapter]
        copies = [torch.empty_like(factor.weight) for _ in range(layer.tp_size)]
        dist.all_gather(copies, factor.weight.detach().contiguous(), group=layer.tp_group)
        same &= all(torch.equal(copies[0], c) for c in copies)
    return same


def _weighted_body():
    import torch.distributed as dist

    import megalora
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    results, replicas = {}, {}
    for layout, tp in (("tp1", 1), ("tp2", 2)):
        peft = megalora.get_peft_model(U.build(full, tp=tp), U.lora_config())
        for name, config in EXTRA.items():
            peft.add_adapter(name, U.lora_config(**config))
        for name in ["default", *EXTRA]:
            U.perturb(peft, name)
        out = {}
        for kind in TYPES + ["svd-clamp"]:
            adapters, weights, kwargs = _case(kind.split("-")[0])
            if kind == "svd-clamp":
                kwargs.update(svd_clamp=0.9, svd_rank=3)
            # Ranks of a TP group start from different generator states on purpose.
            torch.manual_seed(7 + (dist.get_rank() if tp > 1 else 0))
            peft.add_weighted_adapter(adapters, weights, f"m-{kind}", **kwargs)
            out[kind] = U.gathered(peft, f"m-{kind}")
            if tp > 1:
                replicas[kind] = _replicas_identical(peft, f"m-{kind}")
        results[layout] = out
        destroy_parallel()
    return results, replicas


def test_every_combination_type_at_tp2_equals_tp1(dist2):
    (results, replicas), _ = dist2(_weighted_body, timeout_s=600)
    assert set(results["tp1"]) == set(TYPES) | {"svd-clamp"}
    for kind, ref in results["tp1"].items():
        got = results["tp2"][kind]
        assert got.keys() == ref.keys() and ref, kind
        for key in ref:
            assert torch.equal(ref[key], got[key]), f"{kind}: {key} differs between TP=2 and TP=1"
        assert replicas[kind], f"{kind}: a replicated factor differs between the TP ranks"
    # The combination did something: the DARE masks drop entries, so dare_linear != linear.
    key = next(k for k in results["tp1"]["linear"] if k.endswith("lora_A.weight"))
    assert not torch.equal(results["tp1"]["linear"][key], results["tp1"]["dare_linear"][key])
