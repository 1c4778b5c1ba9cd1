"""``megalora verify``'s comparison of a parallel run with a world-size-1 run (files only)."""

from __future__ import annotations

import json
import os

# verify trains both runs with plain SGD (``train.optimizer=sgd``), because
# AdamW is ill-conditioned in its first steps: it divides each gradient
# element by its own magnitude, so an element whose gradient is rounding noise
# moves by +-lr in a direction the noise picks, and the two layouts' weights
# differ far beyond rounding (SmolLM2 at TP=3: 6e-5 in a lora_A after 2 steps,
# with losses equal to 1e-6). The optimizer is elementwise, so given equal
# gradients it does the same on a shard as on the full tensor: what a layout
# can get wrong is the gradient (forward, backward, the TP sync of replicated
# factors, the DP average), the grad norm, and how shards are laid out. SGD's
# update is linear in the gradient, so those stay comparable over every step.
# fp32's unit roundoff is 2**-24 ~ 6e-8; reordered sums (the TP all-reduce,
# split matmuls) over thousands of terms give relative differences of ~1e-6.
# Measured (largest over steps and tensors): tiny GPT at TP=2, 3 steps: loss
# 9e-8, gradients 5e-7, trained weights 2e-7; SmolLM2 at TP=3, 2 steps: loss
# 6e-7, grad norm 9e-7, gradients 3.7e-6, trained weights 2.2e-6.

# Relative difference of a step's loss and of its global grad norm: >100x the
# measured rounding. (Weak detectors: at step 1, B = 0 and the loss is the base
# model's; the gradients below are what a sharding bug changes first.)
LOSS_TOL = 1e-4
# Per-tensor ||g - g_ref|| / ||g_ref|| of a step's gathered gradient: >250x the
# measured rounding; a misplaced shard or a missing sync gives O(1)
# (tests/cli/test_cli.py plants both).
GRAD_TOL = 1e-3
# Relative to each tensor's own norm, with no floor at the global norm: a
# lora_A's gradient at step 2 is ~1e-6 of the global norm (B is still small),
# yet it is computed from equally small factors, so its rounding is relative
# to itself (measured: <= 6e-7, like every other tensor's). A floor would leave
# it unchecked. A gradient that is exactly zero in the reference (lora_A at
# step 1, while B = 0) must be exactly zero in the layout too.
# Per-tensor ||W - W_ref|| after training, relative to the update ||W_ref - W_0||
# (elementwise differences near zero are meaningless): the update is a sum of
# lr * gradients, each within GRAD_TOL. Each step's addition to a stored fp32
# weight may round differently in the two runs (one ulp, <= 2**-23 |w|), so
# steps * 2**-23 * ||W_ref|| is allowed on top (with SGD's small steps a lora_A
# moves by less than that: its gradients, compared above, are what checks it).
WEIGHT_TOL = 1e-3
_ULP = 2.0 ** -23


def _norm(t) -> float:
    return float(t.double().norm())


def _relative(diff: float, scale: float) -> float:
    """``diff / scale``; 0 when both are 0, inf when only ``scale`` is."""
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else float("inf")


def _load_summary(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as handle:
        return json.load(handle)


def _same_keys(a: dict, b: dict, what: str) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"the two runs' {what} hold different tensors: {sorted(a.keys() ^ b.keys())[:3]}")


def _compare_grads(ga: dict, gb: dict) -> list:
    """``[step, worst relative difference, its tensor]`` per step both runs recorded."""
    out = []
    for step in sorted(ga.keys() & gb.keys()):
        a, b = ga[step], gb[step]
        _same_keys(a, b, f"step-{step} gradients")
        rel = {k: _relative(_norm(a[k].double() - b[k].double()), _norm(b[k])) for k in b}
        worst = max(rel, key=rel.get)
        out.append([step, rel[worst], worst])
    return out


def _compare_weights(wa: dict, wb: dict, w0: dict, steps: int) -> dict:
    """Per tensor: ``||W - W_ref|| - rounding budget``, relative to the update ``||W_ref - W_0||``."""
    rel = {}
    for k in wb:
        diff = _norm(wa[k].double() - wb[k].double())
        budget = steps * _ULP * _norm(wb[k])
        update = _norm(wb[k].double() - w0[k].double()) if k in w0 else _norm(wb[k])
        rel[k] = _relative(max(0.0, diff - budget), update)
    return rel


def compare_runs(layout_dir: str, single_dir: str, loss_tol: float = LOSS_TOL, grad_tol: float = GRAD_TOL,
                 weight_tol: float = WEIGHT_TOL) -> dict:
    """Compares two finished runs' output folders (the layout's and world size 1's); files only.

    Checks, each well-conditioned (see the comments above): the initial
    adapters are bit-identical; each step's loss and grad norm agree to
    ``loss_tol`` (relative); each step's gathered gradients agree per tensor
    to ``grad_tol`` relative to their norm; the trained adapters agree per
    tensor to ``weight_tol`` relative to the update. ``report["ok"]`` is
    whether all hold, ``report["failures"]`` says which did not.
    """
    from ..checkpoint import read_adapter_tensors
    from .record import INITIAL_ADAPTER, read_grads

    a, b = _load_summary(layout_dir), _load_summary(single_dir)
    losses = [(s, la, lb) for (s, la), (_, lb) in zip(a["history"], b["history"])]
    loss_step, loss_a, loss_b = max(losses, key=lambda x: abs(x[1] - x[2]))
    norms = [(s, na, nb) for (s, na), (_, nb) in zip(a.get("grad_norms", []), b.get("grad_norms", []))]
    norm_diff = max((abs(na - nb) / max(abs(nb), 1e-12) for _, na, nb in norms), default=0.0)

    init_a = read_adapter_tensors(os.path.join(layout_dir, INITIAL_ADAPTER))
    init_b = read_adapter_tensors(os.path.join(single_dir, INITIAL_ADAPTER))
    _same_keys(init_a, init_b, "initial adapters")
    init_diff = {k: float((init_a[k].double() - init_b[k].double()).abs().max()) for k in init_b}
    init_bad = sorted(k for k, v in init_diff.items() if v > 0 or init_a[k].dtype != init_b[k].dtype)

    grads_a, grads_b = read_grads(layout_dir), read_grads(single_dir)
    grads = _compare_grads(grads_a, grads_b)
    wa = read_adapter_tensors(os.path.join(layout_dir, "adapter"))
    wb = read_adapter_tensors(os.path.join(single_dir, "adapter"))
    _same_keys(wa, wb, "trained adapters")
    upd = _compare_weights(wa, wb, init_b, len(losses))
    worst_w = max(upd, key=upd.get)
    abs_diff = {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wb}
    worst_grad = max(grads, key=lambda g: g[1]) if grads else [None, 0.0, None]

    report = {
        "layout": a["layout"], "reference": b["layout"], "steps": len(losses),
        "losses": [[s, la, lb] for s, la, lb in losses],
        "max_loss_diff": abs(loss_a - loss_b), "max_loss_diff_step": loss_step,
        "max_loss_rel_diff": abs(loss_a - loss_b) / max(abs(loss_b), 1e-12),
        "max_grad_norm_rel_diff": norm_diff,
        "init_tensors": len(init_b), "init_max_diff": max(init_diff.values(), default=0.0),
        "init_mismatched": init_bad[:5],
        "grads": grads, "grad_steps": len(grads),
        "max_grad_rel_diff": worst_grad[1], "max_grad_rel_diff_step": worst_grad[0],
        "max_grad_rel_diff_tensor": worst_grad[2],
        "max_update_rel_diff": upd[worst_w], "max_update_rel_diff_tensor": worst_w,
        "max_weight_diff": max(abs_diff.values()), "max_weight_diff_tensor": max(abs_diff, key=abs_diff.get),
        "tensors_compared": len(wb),
        "eval_loss": [a.get("final_eval_loss"), b.get("final_eval_loss")],
        "tolerances": {"loss": loss_tol, "grad": grad_tol, "weight": weight_tol},
    }
    failures = []
    if init_bad:
        failures.append(f"initial adapters differ in {len(init_bad)} tensor(s), e.g. {init_bad[0]}")
    if not grads or grads_a.keys() != grads_b.keys():
        failures.append(f"gradients recorded at steps {sorted(grads_a)} and {sorted(grads_b)}: run both with "
                        "job.record_grads=true")
    for key, value, tol in (("max_loss_rel_diff", report["max_loss_rel_diff"], loss_tol),
                            ("max_grad_norm_rel_diff", norm_diff, loss_tol),
                            ("max_grad_rel_diff", worst_grad[1], grad_tol),
                            ("max_update_rel_diff", upd[worst_w], weight_tol)):
        if not value <= tol:  # also NaN
            failures.append(f"{key} {value:.3e} > {tol:g}")
    report.update(ok=not failures, failures=failures)
    return report


def format_verify(report: dict, config: str) -> str:
    """The human-readable verify report."""
    lay = report["layout"]
    lines = [f"megalora verify: {config} at TP={lay['tp']} PP={lay['pp']} VPP={lay['vpp']} SP={lay['sp']} "
             f"(world {lay['world_size']}) vs world size 1, {report['steps']} SGD steps",
             f"  initial adapter: {report['init_tensors']} tensors, largest difference {report['init_max_diff']:.3e} "
             "(must be 0: both layouts draw the same full factors)"]
    for step, la, lb in report["losses"]:
        lines.append(f"  step {step}: loss {la:.8f} vs {lb:.8f} (diff {abs(la - lb):.2e})")
    for step, rel, tensor in report["grads"]:
        lines.append(f"  step {step}: gradients, largest ||g - g_ref|| / ||g_ref|| {rel:.3e} in {tensor}")
    tol = report["tolerances"]
    lines += [f"  largest loss difference: {report['max_loss_diff']:.3e} (relative {report['max_loss_rel_diff']:.3e}, "
              f"step {report['max_loss_diff_step']}); grad norm (relative) {report['max_grad_norm_rel_diff']:.3e}"
              f"  [tolerance {tol['loss']:g}]",
              f"  largest gradient difference: {report['max_grad_rel_diff']:.3e} relative to the tensor's norm "
              f"[tolerance {tol['grad']:g}]",
              f"  trained adapter: largest ||W - W_ref|| / ||W_ref - W_0|| {report['max_update_rel_diff']:.3e} in "
              f"{report['max_update_rel_diff_tensor']} [tolerance {tol['weight']:g}]; largest elementwise difference "
              f"{report['max_weight_diff']:.3e}, over {report['tensors_compared']} tensors",
              "  OK" if report["ok"] else "  MISMATCH: " + "; ".join(report["failures"])]
    return "\n".join(lines)
