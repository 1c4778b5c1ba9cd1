"""megalora adapters on megatron-core ↔ HF PEFT adapters on the HF model, exactly.

**Export.** A LoRA on a fused megatron module becomes one LoRA per HF module:
``linear_qkv``'s A is copied to ``q_proj``/``k_proj``/``v_proj`` and its B is
split per query group (rows ``[q_g; k_g; v_g]`` of group ``g``);
``linear_fc1``'s B is split into ``gate_proj``/``up_proj``. Since
``q = B_q A x`` is exactly the q rows of ``B A x``, the HF adapter computes the
same function. Columns of an HF module's B that are all zero (the other
blocks of a block-diagonal B from an import) are dropped with their A rows,
so an imported PEFT adapter exports back at its own ranks. ``target_modules``
and the rank/alpha patterns are rewritten for HF names, and the files are
PEFT's own (``adapter_config.json``, ``adapter_model.safetensors``).

**Import.** Separate q/k/v (or gate/up) LoRAs whose A matrices differ are not
one rank-r LoRA on the fused module. They are imported *exactly*, as one LoRA
of rank ``r_q + r_k + r_v`` on ``linear_qkv``: A is ``[A_q; A_k; A_v]`` and B
is block-diagonal (B_q in the q rows and A_q's columns, and so on), then laid
out per query group. Modules that PEFT did not target get zero rows. When
the A matrices are equal (an adapter that megalora exported) the import keeps
rank r. A per-module scale ``alpha/r`` different from the fused one is folded
into that module's block of B. DoRA magnitudes are per output row, so they
concatenate exactly. Nothing is approximated.

**Embeddings.** An embedding LoRA (``lora_embedding_A`` / ``lora_embedding_B``)
is one module on both sides (``embed_tokens`` / ``wte`` ↔
``embedding.word_embeddings``) and is copied as is. PEFT also saves the frozen
base table of a targeted embedding; the import skips it (the model has it).
QALoRA adapters import (PEFT makes them on GPTQ models) but do not export:
PEFT ignores ``use_qalora`` on ``nn.Linear``.
"""

from __future__ import annotations

import tempfile
from typing import Optional

import torch

from ..collectives import agree_or_raise, all_gather_objects, broadcast_object, group_rank
from .. import lora_math
from ..checkpoint import PREFIX, adapter_state_dict, expert_keys, gather_stages, read_adapter_tensors, write_adapter
from ..config import LoraConfig
from ..initializers.base_weight import reads_base_weight
from ..initializers.conversion import check_convertible, converted_state, initial_state
from ..layers import LoraLayer
from ..lora_math import alpha_for_scaling, scaling
from ..targeting import global_module_names, pattern_value
from .arch import MCORE_LAYER_PREFIX, Arch, arch_from_hf
from .expert_adapters import export_experts, import_experts, split_expert_modules
from .adapter_targets import describe_targets, module_universe, target_fields
from .export import find_hf_config, model_chunks
from .token_adapters import TOKENS, hf_token_indices, mcore_token_indices, split_tokens

SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")
# An embedding LoRA (PEFT's lora.Embedding): copied as is, the embedding being one module on both sides.
EMBEDDING_SUFFIXES = ("lora_embedding_A", "lora_embedding_B")


def _by_module(state: dict[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {suffix: tensor}}`` from PEFT-style keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if body.endswith(".base_layer.weight"):
            # PEFT also saves the (frozen) base table of a targeted embedding
            # (save_embedding_layers='auto'); the model already holds it.
            continue
        suffix = next((s for s in SUFFIXES + EMBEDDING_SUFFIXES if body.endswith("." + s)), None)
        if suffix is None and body.endswith(".bias"):
            raise ValueError(
                f"{source}: tensor {key!r} is a trained model bias (saved for bias='all' or 'lora_only'); the HF "
                "bridge converts LoRA factors only: train with bias='none', or use the megatron adapter as is"
            )
        if suffix is None:
            raise ValueError(
                f"{source}: tensor {key!r} is not a LoRA factor of a linear layer (lora_A/lora_B/"
                "lora_magnitude_vector) or of an embedding (lora_embedding_A/B); modules_to_save and other PEFT "
                "methods are not supported"
            )
        out.setdefault(body[: -len(suffix) - 1], {})[suffix] = tensor
    return out


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    """The ``lora_alpha`` PEFT's config gets: an int where it is whole, as PEFT writes it."""
    alpha = lora_math.alpha_for_scaling(scale, r, rslora)
    return int(alpha) if float(alpha).is_integer() else alpha


# ---------------------------------------------------------------------- export


def _split_factors(arch: Arch, rule, tensors: dict, r: int, alpha: float, rslora: bool, compact: bool):
    """Per HF module: ``(tensors, r, alpha)`` of one fused megatron LoRA."""
    a = tensors["lora_A.weight"]
    split = {s: arch.split(rule, tensors[s]) for s in SUFFIXES[1:] if s in tensors}
    scaling = lora_math.scaling(alpha, r, rslora)
    out = []
    for i in range(len(rule.hf)):
        part = {s: v[i].contiguous() for s, v in split.items()}
        a_i, r_i, alpha_i = a, r, alpha
        keep = part["lora_B.weight"].abs().sum(dim=0) != 0
        if compact and len(rule.hf) > 1 and keep.any() and not keep.all():
            a_i, part["lora_B.weight"] = a[keep], part["lora_B.weight"][:, keep]
            r_i = int(keep.sum())
            alpha_i = _alpha_for(scaling, r_i, rslora)
        part["lora_A.weight"] = a_i.clone()  # one tensor per HF module: safetensors refuses shared storage
        out.append((part, r_i, alpha_i))
    return out


def _is_zero_lora(part: dict) -> bool:
    if "lora_magnitude_vector" in part:
        return False  # DoRA rescales the base output even with B = 0
    return not any(part[s].count_nonzero().item() for s in ("lora_B.weight", "lora_B.bias") if s in part)


def hf_adapter_from_mcore(arch: Arch, state: dict, ranks: dict, config: LoraConfig, compact: bool = True):
    """``(PEFT state dict, {HF module: (r, alpha)}, {HF expert parameter: (r, alpha)})`` from a megalora adapter.

    Routed experts' LoRAs become PEFT ``target_parameters`` LoRAs on the HF
    experts' 3-D parameters (:mod:`megalora.hf.expert_adapters`).
    """
    hf_state, hf_ranks = {}, {}
    tokens, state = split_tokens(state)
    for module, rows in tokens.items():
        _, hprefix, rule = arch.rule_for_mcore(module)
        hf_state[f"{PREFIX}{hprefix}{rule.hf[0]}.{TOKENS}"] = rows
    modules, experts = split_expert_modules(_by_module(state, "the megalora adapter"))
    expert_state, expert_params = export_experts(experts, ranks, arch.num_experts, arch.hf_layer_prefix, PREFIX)
    hf_state.update(expert_state)
    for module, tensors in sorted(modules.items()):
        _, hprefix, rule = arch.rule_for_mcore(module)
        if _is_embedding_lora(rule, tensors):
            for suffix, tensor in tensors.items():
                hf_state[f"{PREFIX}{hprefix}{rule.hf[0]}.{suffix}"] = tensor
            hf_ranks[hprefix + rule.hf[0]] = ranks[module]
            continue
        if not rule.linear:
            raise ValueError(f"{module} is not a linear layer; only linear and embedding LoRA export to HF PEFT")
        r, alpha = ranks[module]
        parts = list(zip(rule.hf, _split_factors(arch, rule, tensors, r, alpha, config.use_rslora, compact)))
        if compact:
            # A module whose LoRA is exactly zero next to non-zero ones was not
            # targeted on the HF side (the zero rows of an import): leave it out.
            live = [(hf, p) for hf, p in parts if not _is_zero_lora(p[0])]
            parts = live or parts
        for hf, (part, r_i, alpha_i) in parts:
            for suffix, tensor in part.items():
                hf_state[f"{PREFIX}{hprefix}{hf}.{suffix}"] = tensor
            hf_ranks[hprefix + hf] = (r_i, alpha_i)
    return hf_state, hf_ranks, expert_params


def _is_embedding_lora(rule, tensors: dict) -> bool:
    """Whether ``tensors`` are an embedding LoRA on ``rule``'s one-to-one embedding module."""
    return not rule.linear and len(rule.hf) == 1 and set(tensors) <= set(EMBEDDING_SUFFIXES)


def _local_ranks(peft_model, adapter: str) -> dict[str, tuple[int, float]]:
    out = {}
    for chunk in model_chunks(peft_model):
        names = global_module_names(chunk)
        for local, module in chunk.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                out[names[local]] = (module.r[adapter], module.lora_alpha[adapter])
    return out


def export_peft_adapter(peft_model, directory: str, hf_config=None, adapter_name: str = "default",
                        compact: bool = True) -> Optional[str]:
    """Collective: write a megalora adapter as an HF PEFT adapter for the HF model.

    ``peft.PeftModel.from_pretrained(hf_model, directory)`` then computes what
    megalora computes on megatron-core. Global rank 0 writes.

    Args:
        peft_model: The megalora ``PeftModel`` on a model built by ``build_gpt_from_hf``.
        directory: Output directory (PEFT's two files go directly into it).
        hf_config: The HF config; default the one recorded on the model.
        adapter_name: Which adapter to export.
        compact: Drop all-zero columns of each HF module's B (see the module docstring).

    Returns:
        ``directory``.
    """
    hf_config = find_hf_config(peft_model, hf_config)
    arch = arch_from_hf(hf_config)
    config = peft_model.peft_config[adapter_name]
    problem = None
    if config.modules_to_save:
        problem = "exporting modules_to_save to HF PEFT is not supported; train an adapter without modules_to_save"
    elif config.use_qalora:
        problem = ("exporting a QALoRA adapter to HF PEFT is not supported: PEFT applies use_qalora to GPTQ layers only "
                   "and ignores it on nn.Linear; export the merged model instead (save_hf_pretrained)")
    convert = reads_base_weight(config.init_lora_weights) or config.init_lora_weights == "corda"
    if config.init_lora_weights == "loftq":
        problem = ("an adapter initialized with LoftQ applies to the quantized base, which HF PEFT does not "
                   "rebuild; export the merged model instead (megalora export)")
    elif convert and problem is None:
        problem = check_convertible(config, None)
    agree_or_raise(problem)
    state, error = gather_stages(adapter_state_dict(peft_model, adapter_name), expert_keys(peft_model, adapter_name))
    # PiSSA/OLoRA/CorDA trained on W_res: exported as PEFT's converted adapter (rank 2r) for the original base.
    initial = (gather_stages(initial_state(peft_model, adapter_name), expert_keys(peft_model, adapter_name))[0]
               if convert else None)
    ranks = {}
    for part in all_gather_objects(_local_ranks(peft_model, adapter_name)):
        ranks.update(part)
    if convert:
        ranks = {k: (2 * r, alpha_for_scaling(scaling(a, r, config.use_rslora), 2 * r, config.use_rslora))
                 for k, (r, a) in ranks.items()}
    if state is not None and error is None:
        try:
            if convert:
                state = converted_state(state, initial)
            hf_state, hf_ranks, expert_params = hf_adapter_from_mcore(arch, state, ranks, config, compact)
            fields = target_fields(arch, hf_ranks, expert_params)
            out_config = LoraConfig(
                task_type=config.task_type or "CAUSAL_LM",
                base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
                lora_dropout=config.lora_dropout, use_rslora=config.use_rslora, use_dora=config.use_dora,
                lora_bias=config.lora_bias, bias=config.bias, init_lora_weights=True,
                fan_in_fan_out=any(rule.conv1d for rule in arch.layer_rules), megatron_config=None,
                inference_mode=True, trainable_token_indices=hf_token_indices(arch, config.trainable_token_indices),
                ensure_weight_tying=config.ensure_weight_tying, **fields,
            )
            write_adapter(directory, out_config, hf_state)
        except Exception as exc:  # re-raised on every rank below
            error = f"exporting adapter {adapter_name!r} to {directory} failed: {type(exc).__name__}: {exc}"
    error = broadcast_object(error)
    if error is not None:
        raise RuntimeError(error)
    return directory


# ---------------------------------------------------------------------- import


def _fuse_adapters(arch: Arch, rule, parts: dict[int, tuple[dict, int, float]], rslora: bool, module: str):
    """One megatron LoRA ``(tensors, r, alpha)`` equal to the HF LoRAs ``parts`` (by position in ``rule.hf``)."""
    first_tensors, first_r, first_alpha = next(iter(parts.values()))
    scale = lora_math.scaling(first_alpha, first_r, rslora)
    if len(rule.hf) == 1:
        fused = {s: arch.fuse(rule, [t]) if s != "lora_A.weight" else t for s, t in first_tensors.items()}
        return fused, first_r, first_alpha
    if any("lora_magnitude_vector" in t for t, _, _ in parts.values()) and len(parts) < len(rule.hf):
        raise NotImplementedError(
            f"DoRA on only some of {list(rule.hf)} cannot be fused into {module}: target all of them"
        )
    if rule.kind == "qkv":
        rows = list(arch.qkv_rows)
    else:  # "cat": equal blocks ([gate; up])
        rows = [first_tensors["lora_B.weight"].shape[0]] * len(rule.hf)
    scales = {i: lora_math.scaling(alpha, r, rslora) for i, (_, r, alpha) in parts.items()}
    shared = all(torch.equal(t["lora_A.weight"], first_tensors["lora_A.weight"]) for t, _, _ in parts.values()) \
        and len(set(scales.values())) == 1
    if shared:
        a, r, alpha, offsets = first_tensors["lora_A.weight"], first_r, first_alpha, None
    else:
        a = torch.cat([parts[i][0]["lora_A.weight"] for i in sorted(parts)], dim=0)
        r = a.shape[0]
        alpha = _alpha_for(scale, r, rslora)
        offsets, start = {}, 0
        for i in sorted(parts):
            offsets[i] = (start, start + parts[i][1])
            start += parts[i][1]
    like = first_tensors["lora_B.weight"]
    blocks: dict[str, list] = {}
    for i, n_rows in enumerate(rows):
        tensors = parts[i][0] if i in parts else {}
        ratio = 1.0 if i not in parts or scales[i] == scale else scales[i] / scale
        b = torch.zeros(n_rows, r, dtype=like.dtype)
        if i in parts:
            cols = slice(None) if offsets is None else slice(*offsets[i])
            b[:, cols] = tensors["lora_B.weight"] * ratio if ratio != 1.0 else tensors["lora_B.weight"]
        blocks.setdefault("lora_B.weight", []).append(b)
        if "lora_B.bias" in first_tensors:
            bias = tensors.get("lora_B.bias", torch.zeros(n_rows, dtype=like.dtype))
            blocks.setdefault("lora_B.bias", []).append(bias * ratio if ratio != 1.0 else bias)
        if "lora_magnitude_vector" in tensors:
            blocks.setdefault("lora_magnitude_vector", []).append(tensors["lora_magnitude_vector"])
    fused = {s: arch.fuse(rule, v).contiguous() for s, v in blocks.items()}
    fused["lora_A.weight"] = a.contiguous()
    return fused, r, alpha


def mcore_adapter_from_hf(arch: Arch, peft_config: LoraConfig, state: dict, source: str = "the PEFT adapter"):
    """``(megalora state dict, {megatron module: (r, alpha)})`` from an HF PEFT adapter."""
    where = arch.hf_module_to_mcore()
    grouped: dict[str, dict[int, tuple]] = {}
    out, ranks = {}, {}
    embeddings: dict[str, tuple] = {}
    tokens, state = split_tokens(state)
    for hf_module, rows in tokens.items():
        if hf_module not in where:
            raise ValueError(f"{source}: trainable tokens on {hf_module!r}, which the HF {arch.model_type} model lacks")
        out[f"{PREFIX}{where[hf_module][0]}.{TOKENS}"] = rows
    for hf_module, tensors in _by_module(state, source).items():
        expert = import_experts(hf_module, tensors, peft_config.target_parameters, arch.num_experts,
                                arch.hf_layer_prefix) if arch.num_experts else None
        if expert is not None:
            layer, fc, param, module, pairs = expert
            alpha = pattern_value(peft_config.alpha_pattern, f"{module}.{param}", peft_config.lora_alpha)
            for e, (a, b) in enumerate(pairs):
                name = f"{layer}.mlp.experts.local_experts.{e}.{fc}"
                out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = a, b
                ranks[name] = (a.shape[0], alpha)
            continue
        if hf_module not in where:
            raise ValueError(f"{source}: module {hf_module!r} is not a linear layer of the HF {arch.model_type} model")
        module, _ = where[hf_module]
        if _is_embedding_lora(arch.rule_for_mcore(module)[2], tensors):
            if set(tensors) != set(EMBEDDING_SUFFIXES):
                raise ValueError(f"{source}: {hf_module} lacks lora_embedding_A or lora_embedding_B")
            alpha = pattern_value(peft_config.alpha_pattern, hf_module, peft_config.lora_alpha)
            embeddings[module] = (tensors, tensors["lora_embedding_A"].shape[0], alpha)
            continue
        if "lora_A.weight" not in tensors or "lora_B.weight" not in tensors:
            raise ValueError(f"{source}: {hf_module} lacks lora_A or lora_B")
        r = tensors["lora_A.weight"].shape[0]
        alpha = pattern_value(peft_config.alpha_pattern, hf_module, peft_config.lora_alpha)
        module, pos = where[hf_module]
        grouped.setdefault(module, {})[pos] = (tensors, r, alpha)
    for module, parts in sorted(grouped.items()):
        _, _, rule = arch.rule_for_mcore(module)
        fused, r, alpha = _fuse_adapters(arch, rule, parts, peft_config.use_rslora, module)
        for suffix, tensor in fused.items():
            out[f"{PREFIX}{module}.{suffix}"] = tensor
        ranks[module] = (r, alpha)
    for module, (tensors, r, alpha) in embeddings.items():
        for suffix, tensor in tensors.items():
            out[f"{PREFIX}{module}.{suffix}"] = tensor
        ranks[module] = (r, alpha)
    return out, ranks


def import_peft_adapter(model, directory: str, adapter_name: str = "default", hf_config=None,
                        is_trainable: bool = False, save_directory: Optional[str] = None):
    """Collective: put an HF PEFT adapter (made on the HF model) on the megatron model, exactly.

    Args:
        model: A model built by ``build_gpt_from_hf`` (this rank's stage, or
            its virtual chunks), or a megalora ``PeftModel`` on one (the
            adapter is then added under ``adapter_name``).
        directory: The PEFT adapter directory (``adapter_config.json`` and
            ``adapter_model.safetensors``; pickle files are never read).
        adapter_name: The name of the new adapter.
        hf_config: The HF config; default the one recorded on the model.
        is_trainable: Whether the imported adapter is trainable.
        save_directory: Also write the converted megalora adapter there (rank 0).

    Returns:
        The megalora ``PeftModel``. Its config has ``linear_qkv``/``linear_fc1``
        ranks equal to the sum of the fused HF modules' ranks when their A differ.
    """
    from ..model import PeftModel

    hf_config = find_hf_config(model, hf_config)
    arch = arch_from_hf(hf_config)
    peft_config = LoraConfig.from_pretrained(directory)
    problem = None
    if peft_config.modules_to_save:
        problem = f"{directory}: modules_to_save={peft_config.modules_to_save} is not supported by the HF import"
    agree_or_raise(problem)
    state, ranks = mcore_adapter_from_hf(arch, peft_config, read_adapter_tensors(directory), directory)
    fields = describe_targets(ranks, module_universe(arch.linear_mcore_modules(), ranks), MCORE_LAYER_PREFIX)
    config = LoraConfig(
        task_type="CAUSAL_LM", base_model_name_or_path=peft_config.base_model_name_or_path,
        lora_dropout=peft_config.lora_dropout, use_rslora=peft_config.use_rslora, use_dora=peft_config.use_dora,
        lora_bias=peft_config.lora_bias, bias=peft_config.bias, init_lora_weights=True,
        use_qalora=peft_config.use_qalora, qalora_group_size=peft_config.qalora_group_size,
        trainable_token_indices=mcore_token_indices(arch, peft_config.trainable_token_indices),
        ensure_weight_tying=peft_config.ensure_weight_tying, **fields,
    )
    with tempfile.TemporaryDirectory(prefix="megalora-import-") as tmp:
        write_adapter(tmp, config, state)
        if save_directory is not None and group_rank(None) == 0:
            write_adapter(save_directory, config, state)
        if isinstance(model, PeftModel):
            model.load_adapter(tmp, adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        hf_chunks = model_chunks(model)
        target = hf_chunks if len(hf_chunks) > 1 else hf_chunks[0]
        return PeftModel.from_pretrained(target, tmp, adapter_name=adapter_name, is_trainable=is_trainable)
