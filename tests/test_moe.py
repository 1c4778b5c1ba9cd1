"""LoRA on megatron-core's routed experts under expert parallelism, against world size 1.

Every layout builds the same tiny MoE GPT (4 routed experts, top-2, a shared
expert, SequentialMLP; base weights drawn from their global names, see
tests/moe_utils.py), puts the same adapter on every linear layer (experts
included; ``init_lora_weights=False`` so both factors get gradients from the
first step) and trains the routers whole (``modules_to_save=["router"]``), and trains 3 plain-SGD steps through the trainer's megatron-core
DDP, ``finalize_model_grads`` and optimizer. Load balancing is off, so the
loss is the LM loss alone. The per-step losses and the saved adapter file
(every expert, full size, global indices) must equal the world-size-1 run's.

SGD, not Adam: its update is linear in the gradient, so a gradient reduced
over the wrong group, or summed twice, changes the weights (Adam divides most
of a scale error away).

Layouts: EP=2 (alltoall and allgather dispatchers), TP2xEP2 with expert-TP 1
and 2, TP1xEP2 with expert-TP 2 (an expert-TP group that is not the TP
group), PP2xEP2. Resharding: the EP=2 file loads at EP=1 (world size 1) and at
TP2xEP2 (expert-TP 1 and 2) with the same loss (merged and unmerged too), and
saving it again there gives the same bytes, as does the merged export
(``export_merged``: every expert once); the adapter-only distributed
checkpoint saved at EP=2 loads there too.
"""

from __future__ import annotations

import os

import torch

from tests import gpt_utils as G
from tests import moe_utils as MU
from tests.multirank import run_on_ranks

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
STEPS, MICRO, LR = 3, 2, 1.0
# fp32 throughout. The layouts differ only in summation order: the TP and
# expert-TP all-reduces, the order in which tokens reach an expert (so its
# weight-gradient GEMM sums them in another order), the DP/expert-DP average.
# Measured differences: <= 4e-6 on the factors (magnitude ~0.1-1) and ~1e-7 on
# the losses; a reduction over a wrong group moves factors by > 1e-2 (see the
# weight-change check in the test, which is what the tolerance protects).
ATOL = 2e-5
LOSS_RTOL = 1e-5

LAYOUTS_2 = [
    dict(tp=1, ep=2, etp=1, dispatcher="alltoall"),
    dict(tp=1, ep=2, etp=1, dispatcher="allgather"),
]
LAYOUTS_4 = [
    dict(tp=2, ep=2, etp=1, dispatcher="alltoall"),
    dict(tp=2, ep=2, etp=2, dispatcher="allgather"),
    dict(tp=1, ep=2, etp=2, dispatcher="alltoall"),
    dict(tp=1, ep=2, etp=1, dispatcher="alltoall", pp=2),
]


def _name(layout: dict) -> str:
    return "_".join(f"{k}{v}" for k, v in layout.items())


def _lora_config():
    import megalora

    return megalora.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                               modules_to_save=["router"])


def _init(tp=1, ep=1, etp=1, pp=1, **_):
    import megalora

    megalora.init_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                           expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)


def _model(layout: dict):
    cfg = MU.moe_config(**{k: v for k, v in layout.items()})
    return MU.build_moe_stage(cfg)[0]


def _train_and_save(layout: dict, out: str, dist_dir: str = "") -> list:
    """Train at ``layout``, save the adapter under ``out/<layout>`` (and as an adapter-only
    distributed checkpoint in ``dist_dir``); the last stage's losses, then the parameter counts."""
    import megalora
    from megalora.parallel_start import destroy_parallel

    _init(**layout)
    peft = megalora.get_peft_model(_model(layout), _lora_config())
    _check_router_copy(peft)
    counts = peft.get_nb_trainable_parameters()
    losses, norms = MU.ddp_train([peft.base_model.model], G.pipeline_steps(STEPS, MICRO), lr=LR, optimizer="sgd")
    peft.save_pretrained(os.path.join(out, _name(layout)))
    if dist_dir:
        from megalora.dist_checkpoint import save_adapter_dist_checkpoint

        save_adapter_dist_checkpoint(peft, dist_dir)
    destroy_parallel()
    return [*losses, *counts, *norms]


def _check_router_copy(peft) -> None:
    """The trained router copy keeps the original's dtype and megatron-core attributes; the original is frozen."""
    for name, module in peft.named_modules():
        if name.endswith("mlp.router"):
            original, copy_ = module.original_module.weight, module.modules_to_save["default"].weight
            assert copy_.dtype == original.dtype and copy_.requires_grad and not original.requires_grad, name
            for attr in ("sequence_parallel", "allreduce"):
                assert getattr(copy_, attr, None) == getattr(original, attr, None), (name, attr)


def _eval_loss(peft) -> float:
    peft.eval()
    with torch.no_grad():
        return G.lm_loss(peft.get_base_model(), G.batches(1, seed=7)[0]).item()


def _load(layout: dict, path: str, resave: str) -> float:
    """Load ``path`` at ``layout``, save it again to ``resave``; the loss on a fixed batch.

    Merging the adapter into the (expert-sharded) base weights and unmerging it
    again give the same loss.
    """
    import megalora
    from megalora.parallel_start import destroy_parallel

    _init(**layout)
    peft = megalora.PeftModel.from_pretrained(_model(layout), path)
    loss = _eval_loss(peft)
    peft.merge_adapter()
    merged = _eval_loss(peft)
    peft.unmerge_adapter()
    unmerged = _eval_loss(peft)
    # fp32: merging changes only the rounding of W + s*B@A (~1e-7 relative per weight).
    assert abs(merged - loss) <= 1e-5 * loss and abs(unmerged - loss) <= 1e-5 * loss, (loss, merged, unmerged)
    peft.save_pretrained(resave)
    megalora.export_merged(peft, resave + "_merged", progressbar=False)
    destroy_parallel()
    return loss


def _load_dist(layout: dict, dist_dir: str) -> float:
    """A fresh adapter at ``layout`` loaded from the adapter-only distributed checkpoint; the fixed-batch loss."""
    import megalora
    from megalora.dist_checkpoint import load_adapter_dist_checkpoint
    from megalora.parallel_start import destroy_parallel

    _init(**layout)
    peft = megalora.get_peft_model(_model(layout), _lora_config())
    load_adapter_dist_checkpoint(peft, dist_dir)
    loss = _eval_loss(peft)
    destroy_parallel()
    return loss


def _two_ranks(out: str) -> list:
    dist_dir = os.path.join(out, "dist_ep2")
    losses = [_train_and_save(layout, out, dist_dir if i == 0 else "") for i, layout in enumerate(LAYOUTS_2)]
    path = os.path.join(out, _name(LAYOUTS_2[0]))
    return [losses, _load(LAYOUTS_2[0], path, os.path.join(out, "resave_ep2"))]


def _four_ranks(out: str) -> list:
    losses = [_train_and_save(layout, out) for layout in LAYOUTS_4]
    path = os.path.join(out, _name(LAYOUTS_2[0]))
    loads = [_load(layout, path, os.path.join(out, f"resave_{_name(layout)}")) for layout in LAYOUTS_4[:2]]
    loads += [_load_dist(layout, os.path.join(out, "dist_ep2")) for layout in LAYOUTS_4[:2]]
    return [losses, loads]


def _world_one(out: str) -> list:
    reference = dict(tp=1, ep=1, etp=1, dispatcher="alltoall")
    losses = _train_and_save(reference, out)
    init = _init_state()
    loaded = _load(reference, os.path.join(out, _name(LAYOUTS_2[0])), os.path.join(out, "resave_ep1"))
    return [losses, init, [loaded, _load_dist(reference, os.path.join(out, "dist_ep2"))]]


def _init_state() -> dict:
    import megalora
    from megalora.checkpoint import adapter_state_dict

    _init()
    peft = megalora.get_peft_model(_model(dict(tp=1, ep=1, etp=1)), _lora_config())
    return adapter_state_dict(peft, "default")


def _file(path: str) -> dict:
    from megalora.checkpoint import read_adapter_tensors

    return read_adapter_tensors(path)


def _merged(directory: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(directory, "model.safetensors"))


def _assert_same(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: keys differ, e.g. {sorted(got.keys() ^ ref.keys())[:3]}"
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=0, msg=lambda m, k=key: f"{what} {k}: {m}")


def test_expert_parallel_lora_matches_world_size_one_and_reshards(tmp_path):
    out = str(tmp_path)
    # The EP=2 file must exist before world size 1 loads it.
    losses2, loaded_ep2 = run_on_ranks(2, _two_ranks, out, timeout_s=600)[0]
    losses4, loaded4 = run_on_ranks(4, _four_ranks, out, timeout_s=900)[-1]
    ref_losses, init, loaded_ep1 = run_on_ranks(1, _world_one, out)[0]

    ref = _file(os.path.join(out, _name(dict(tp=1, ep=1, etp=1, dispatcher="alltoall"))))
    experts = sorted({k.split(".local_experts.")[1].split(".")[0] for k in ref if ".local_experts." in k})
    # 2 layers x (qkv, proj, shared fc1/fc2, 4 experts x fc1/fc2) x (A, B) + 2 routers.
    assert experts == ["0", "1", "2", "3"] and len(ref) == 50, (experts, len(ref))
    assert any(".mlp.shared_experts.linear_fc1.lora_A." in k for k in ref), "the shared expert has no adapter"
    # The weights moved far beyond the tolerance: a wrong gradient would show.
    moved = min((ref[k] - init[k]).abs().max().item() for k in ref)
    assert moved > 100 * ATOL, moved

    for layout, losses in zip(LAYOUTS_2 + LAYOUTS_4, losses2 + losses4):
        # Parameter counts (trainable, all): every expert counted once, at every layout.
        assert losses[STEPS:STEPS + 2] == ref_losses[STEPS:STEPS + 2], (_name(layout), losses, ref_losses)
        # megatron-core's grad norm (dense and expert optimizers): each tensor counted once.
        torch.testing.assert_close(torch.tensor(losses[STEPS + 2:]), torch.tensor(ref_losses[STEPS + 2:]),
                                   rtol=LOSS_RTOL, atol=0, msg=lambda m, n=_name(layout): f"{n} grad norms: {m}")
        torch.testing.assert_close(torch.tensor(losses[:STEPS]), torch.tensor(ref_losses[:STEPS]), rtol=LOSS_RTOL,
                                   atol=0, msg=lambda m, n=_name(layout): f"{n} losses: {m}")
        _assert_same(_file(os.path.join(out, _name(layout))), ref, _name(layout))

    # Resharding the EP=2 file: the same function at every layout, and the same bytes saved again.
    ep2_file = _file(os.path.join(out, _name(LAYOUTS_2[0])))
    for loss in [*loaded_ep1, *loaded4]:
        assert abs(loss - loaded_ep2) <= 1e-5 * abs(loaded_ep2), (loss, loaded_ep2)
    merged_ep1 = _merged(os.path.join(out, "resave_ep1_merged"))
    assert any(".local_experts.3.linear_fc2.weight" in k for k in merged_ep1), sorted(merged_ep1)[:5]
    for resave in ["resave_ep1", "resave_ep2", *(f"resave_{_name(x)}" for x in LAYOUTS_4[:2])]:
        again = _file(os.path.join(out, resave))
        assert again.keys() == ep2_file.keys() and all(torch.equal(again[k], ep2_file[k]) for k in again), resave
        # The merged export: every expert once, the same bytes at every layout.
        merged = _merged(os.path.join(out, resave + "_merged"))
        assert merged.keys() == merged_ep1.keys(), (resave, sorted(merged.keys() ^ merged_ep1.keys())[:3])
        assert all(torch.equal(merged[k], merged_ep1[k]) for k in merged), resave


def _router_target_error() -> str:
    import megalora

    _init()
    model = _model(dict(tp=1, ep=1, etp=1))
    try:
        megalora.get_peft_model(model, megalora.LoraConfig(r=2, target_modules=["linear_proj", "router"]))
    except TypeError as exc:
        return str(exc)
    return ""


def test_router_as_target_is_a_one_line_error():
    message = run_on_ranks(1, _router_target_error)[0]
    assert "router" in message and "modules_to_save=['router']" in message and "\n" not in message, message
