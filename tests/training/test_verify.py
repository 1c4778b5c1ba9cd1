"""``compare_runs`` (what ``megalora verify`` decides with) on synthetic run folders: files only, no processes.

Each case starts from two identical runs and plants one difference: rounding
noise must pass, every real difference must fail naming its check.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from megalora.training.record import INITIAL_ADAPTER, grads_file
from megalora.training.verify import compare_runs

A = "base_model.model.decoder.layers.0.mlp.linear_fc1.lora_A.weight"
B = "base_model.model.decoder.layers.0.mlp.linear_fc1.lora_B.weight"
STEPS = 2


def _run(root, init, final, grads, losses=(5.0, 4.0)) -> str:
    os.makedirs(root, exist_ok=True)
    for folder, tensors in ((INITIAL_ADAPTER, init), ("adapter", final)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  os.path.join(root, folder, "adapter_model.safetensors"))
    for step, g in grads.items():
        os.makedirs(os.path.dirname(grads_file(root, step)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in g.items()}, grads_file(root, step))
    summary = {"layout": {"tp": 2, "pp": 1, "vpp": None, "sp": False, "world_size": 2},
               "history": [[s + 1, l] for s, l in enumerate(losses)],
               "grad_norms": [[s + 1, 1.0] for s in range(len(losses))]}
    with open(os.path.join(root, "summary.json"), "w") as handle:
        json.dump(summary, handle)
    return str(root)


def _reference():
    gen = torch.Generator().manual_seed(0)
    init = {A: torch.randn(4, 32, generator=gen) * 0.05, B: torch.zeros(64, 4)}
    # Step 1: B = 0, so A's gradient is exactly zero; step 2: A's is ~1e-6 of B's.
    grads = {1: {A: torch.zeros(4, 32), B: torch.randn(64, 4, generator=gen)},
             2: {A: torch.randn(4, 32, generator=gen) * 1e-6, B: torch.randn(64, 4, generator=gen)}}
    lr = 1e-3
    final = {k: init[k] - lr * (grads[1][k] + grads[2][k]) for k in init}
    return init, final, grads


def _noisy(tensors: dict, rel: float, seed: int) -> dict:
    """Each tensor plus noise of ``rel`` times its norm (what reordered fp32 sums do)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in tensors.items():
        noise = torch.randn(v.shape, generator=gen)
        out[k] = v + rel * v.norm() * noise / noise.norm() if v.norm() > 0 else v.clone()
    return out


def test_rounding_noise_passes(tmp_path):
    init, final, grads = _reference()
    ref = _run(tmp_path / "single", init, final, grads)
    lay = _run(tmp_path / "layout", init, {k: v.clone() for k, v in final.items()},
               {s: _noisy(g, 1e-6, s) for s, g in grads.items()}, losses=(5.0 + 3e-6, 4.0 - 2e-6))
    report = compare_runs(lay, ref)
    assert report["ok"], report["failures"]
    assert report["init_max_diff"] == 0 and report["grad_steps"] == STEPS
    assert 0 < report["max_grad_rel_diff"] < 2e-6  # A's tiny step-2 gradient is compared relative to itself


@pytest.mark.parametrize("case,check", [
    ("init", "initial adapters differ"),
    ("b-rows-swapped", "max_grad_rel_diff"),          # B's shard in the wrong place
    ("a-grad-halved", "max_grad_rel_diff"),           # a TP-partial gradient: missing sync
    ("a-grad-not-zero", "max_grad_rel_diff"),         # exactly zero in the reference must stay zero
    ("weights", "max_update_rel_diff"),               # gathered / applied wrongly after training
    ("loss", "max_loss_rel_diff"),
    ("missing-step", "gradients recorded at steps"),
])
def test_each_real_difference_fails(tmp_path, case, check):
    init, final, grads = _reference()
    ref = _run(tmp_path / "single", init, final, grads)
    init2, final2 = dict(init), {k: v.clone() for k, v in final.items()}
    grads2 = {s: dict(g) for s, g in grads.items()}
    losses = (5.0, 4.0)
    if case == "init":
        init2[A] = init[A].clone()
        init2[A][0, 0] = torch.nextafter(init[A][0, 0], torch.tensor(1.0))  # one ulp
    elif case == "b-rows-swapped":
        grads2[1][B] = torch.cat([grads[1][B][32:], grads[1][B][:32]])
    elif case == "a-grad-halved":
        grads2[2][A] = grads[2][A] / 2
    elif case == "a-grad-not-zero":
        grads2[1][A] = torch.full_like(grads[1][A], 1e-12)
    elif case == "weights":
        final2[B] = final[B] + 0.01 * (final[B] - init[B])
    elif case == "loss":
        losses = (5.0, 4.01)
    elif case == "missing-step":
        del grads2[2]
    report = compare_runs(_run(tmp_path / "layout", init2, final2, grads2, losses), ref)
    assert not report["ok"]
    assert any(f.startswith(check) for f in report["failures"]), report["failures"]
