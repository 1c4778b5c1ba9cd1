"""megalora inside Megatron-LM's own ``pretrain()`` (``pretrain_gpt.py``), as a plug-in.

Three pieces, used by ``launch/pretrain_gpt_lora.py``:

* :func:`add_lora_args` is an ``extra_args_provider``: it adds ``--lora-r``,
  ``--lora-alpha``, ``--lora-dropout``, ``--lora-target-modules``,
  ``--lora-rank-pattern``, ``--lora-load``, ``--lora-save`` and friends, and
  returns the parser (Megatron-LM requires that).
* :func:`lora_model_provider` wraps a ``model_provider``. Megatron-LM's
  ``get_model`` calls the provider with keyword arguments only
  (``pre_process``, ``post_process``, ``config``, ``pg_collection``, and
  ``vp_stage`` once per virtual chunk), then moves the model to the GPU and
  wraps it in ``Float16Module`` and ``DistributedDataParallel``. LoRA must be in
  the model and the base frozen *before* that, so DDP allocates grad buffers
  for the adapter only; the wrapper does both inside the provider. Under
  virtual pipelining every chunk's base is frozen as it is built, and LoRA is
  injected into all of this stage's chunks together when the provider builds
  the last one (still before ``get_model`` wraps anything), so the chunks form
  one :class:`megalora.PeftModel` that saves and loads as one adapter.
  ``--lora-load`` loads a saved adapter right after injection.
* :func:`install_save_hook` makes every Megatron-LM checkpoint save also write
  the adapter, in PEFT's format, to ``--lora-save/iter_XXXXXXX`` (and
  :func:`save_adapter` writes it on demand, e.g. after ``pretrain()`` returns).

The returned model is the base ``GPTModel`` with LoRA layers swapped in, not a
``PeftModel`` wrapper, so Megatron-LM sees the module tree it expects. The
LoRA layers' ``sharded_state_dict`` keep the base layers' checkpoint keys, so
``--load`` of a base-model distributed checkpoint still finds its tensors
(load with ``--finetune --no-load-optim --no-load-rng``; the adapter's keys are
absent from a base checkpoint, so allow missing keys with
``--dist-ckpt-strictness log_all``). Replicated LoRA factors are tagged
``average_gradients_across_tp_domain``: Megatron-LM's
``finalize_model_grads`` sums their TP-partial grads, and sharded factors
carry ``tensor_model_parallel``, so its grad clipping counts them once.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Optional

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]

# The PeftModel of the model get_model built last, and the chunks waiting for
# injection under virtual pipelining.
_STATE: dict[str, Any] = {"peft_model": None, "pending": []}


def _json_or_pairs(text: str) -> dict:
    """``'{"linear_fc2": 4}'`` or ``linear_fc2=4,linear_qkv=8`` → a dict of numbers."""
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, num = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not name=value; pass e.g. linear_fc2=4,linear_qkv=8 or a JSON object")
        out[key.strip()] = float(num) if "." in num else int(num)
    return out


def _init_value(text: str):
    lowered = text.lower()
    return {"true": True, "false": False}.get(lowered, text)


def add_lora_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: adds the ``--lora-*`` options and returns the parser.

    The options mirror :class:`megalora.LoraConfig`'s fields (PEFT's names),
    plus where to load and save the adapter.
    """
    g = parser.add_argument_group(title="megalora LoRA")
    g.add_argument("--lora-r", type=int, default=8, help="LoRA rank r.")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scale alpha/r).")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="Dropout on the LoRA input.")
    g.add_argument("--lora-target-modules", nargs="+", default=list(DEFAULT_TARGETS),
                   help="Module names (suffixes) to adapt, or 'all-linear'. Matched on global names.")
    g.add_argument("--lora-exclude-modules", nargs="+", default=None, help="Module names to leave alone.")
    g.add_argument("--lora-layers-to-transform", nargs="+", type=int, default=None,
                   help="Global layer indices (0-based) to adapt; default all.")
    g.add_argument("--lora-rank-pattern", type=_json_or_pairs, default=None,
                   help="Per-module ranks: linear_fc2=4,decoder.layers.0.self_attention.linear_qkv=16 or JSON.")
    g.add_argument("--lora-alpha-pattern", type=_json_or_pairs, default=None, help="Per-module alphas, same form.")
    g.add_argument("--lora-use-rslora", action="store_true", help="Scale by alpha/sqrt(r) (rsLoRA).")
    g.add_argument("--lora-use-dora", action="store_true", help="DoRA (weight-decomposed LoRA).")
    g.add_argument("--lora-init", type=_init_value, default=True,
                   help="init_lora_weights: true (PEFT's default), false, gaussian or orthogonal.")
    g.add_argument("--lora-bias", choices=("none", "all", "lora_only"), default="none", help="Which biases train.")
    g.add_argument("--lora-modules-to-save", nargs="+", default=None,
                   help="Modules trained in full and saved with the adapter (e.g. output_layer).")
    g.add_argument("--lora-seed", type=int, default=None,
                   help="Seed of the LoRA init (default Megatron-LM's --seed); the init is the same at every layout.")
    g.add_argument("--lora-load", type=str, default=None,
                   help="A saved adapter folder (adapter_config.json + adapter_model.safetensors) to start from.")
    g.add_argument("--lora-save", type=str, default=None,
                   help="Where adapters go: <dir>/iter_XXXXXXX at every Megatron-LM checkpoint save, and "
                        "<dir>/final at the end of launch/pretrain_gpt_lora.py.")
    return parser


def lora_config_from_args(args: argparse.Namespace):
    """The :class:`megalora.LoraConfig` the ``--lora-*`` options describe."""
    from ..config import LoraConfig

    targets = args.lora_target_modules
    if targets is not None and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    return LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets,
        exclude_modules=args.lora_exclude_modules, layers_to_transform=args.lora_layers_to_transform,
        rank_pattern=args.lora_rank_pattern or {}, alpha_pattern=args.lora_alpha_pattern or {},
        use_rslora=args.lora_use_rslora, use_dora=args.lora_use_dora, init_lora_weights=args.lora_init,
        bias=args.lora_bias, modules_to_save=args.lora_modules_to_save,
    )


def _freeze(module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


def _inject(chunks: list, args: argparse.Namespace):
    """Collective: LoRA into this stage's chunks as one PeftModel, then ``--lora-load``."""
    from .. import lora_seed
    from ..checkpoint import load_adapter_weights
    from ..model import get_peft_model

    # Megatron-LM seeds each stage differently; LoRA draws from one base seed on every rank.
    seed = getattr(args, "lora_seed", None)
    if seed is None:
        seed = getattr(args, "seed", None)
    if seed is not None:
        lora_seed.set_lora_init_seed(seed)
    peft_model = get_peft_model(chunks if len(chunks) > 1 else chunks[0], lora_config_from_args(args))
    if args.lora_load:
        load_adapter_weights(peft_model, args.lora_load, "default")
    # Megatron-LM prints its own count of every rank's shard; this is the adapter's, global, once (rank 0).
    peft_model.print_trainable_parameters()
    _STATE["peft_model"] = peft_model
    return peft_model


def lora_model_provider(model_provider: Callable, args: Optional[argparse.Namespace] = None) -> Callable:
    """Wraps a Megatron-LM ``model_provider`` so that every model it builds carries LoRA with its base frozen.

    Args:
        model_provider: Called as Megatron-LM's ``get_model`` calls it
            (``pre_process=..., post_process=..., [vp_stage=...], config=...,
            pg_collection=...``; positional arguments are passed on too).
        args: The parsed arguments holding the ``--lora-*`` options; default
            ``megatron.training.get_args()`` at call time.

    Returns:
        A provider with the same call signature. It returns the base model
        (with LoRA layers in it); the :class:`megalora.PeftModel` over all of
        this stage's chunks is :func:`peft_model`.
    """

    def provider(*pargs, **kwargs):
        from megatron.core import parallel_state as ps

        a = args
        if a is None:
            from megatron.training import get_args

            a = get_args()
        model = model_provider(*pargs, **kwargs)
        _freeze(model)
        vp_stage = kwargs.get("vp_stage")
        vp_size = getattr(a, "virtual_pipeline_model_parallel_size", None)
        if vp_size is None and ps.model_parallel_is_initialized():
            vp_size = ps.get_virtual_pipeline_model_parallel_world_size()
        if vp_stage is None or not vp_size or vp_size == 1:
            _STATE["pending"] = []
            _inject([model], a)
            return model
        if vp_stage == 0:
            _STATE["pending"] = []
        _STATE["pending"].append(model)
        if len(_STATE["pending"]) != vp_stage + 1:
            raise RuntimeError(
                f"lora_model_provider: virtual chunk {vp_stage} built out of order (have "
                f"{len(_STATE['pending'])} chunks); Megatron-LM's get_model builds chunks 0..{vp_size - 1} in order")
        if vp_stage == vp_size - 1:
            chunks, _STATE["pending"] = _STATE["pending"], []
            _inject(chunks, a)
        return model

    provider.__wrapped__ = model_provider
    return provider


def peft_model():
    """The :class:`megalora.PeftModel` over the chunks the wrapped provider built last."""
    if _STATE["peft_model"] is None:
        raise RuntimeError("no LoRA model yet: build the model through lora_model_provider(...) first")
    return _STATE["peft_model"]


def save_adapter(directory: str) -> str:
    """Collective: write the current adapter in PEFT's format (rank 0 writes)."""
    peft_model().save_pretrained(directory)
    return directory


def adapter_dir_for(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def install_save_hook(save_root: Optional[str] = None) -> Callable:
    """Every Megatron-LM checkpoint save also writes the adapter to ``<save_root>/iter_XXXXXXX``.

    Patches ``megatron.training.training.save_checkpoint`` (the name the
    training loop calls); the original runs first. ``save_root`` defaults to
    ``--lora-save`` (nothing is installed when both are unset).

    Returns:
        The hook, so a test or script can call it directly with
        ``(iteration, ...)`` as Megatron-LM does.
    """
    from megatron.training import training

    original = training.save_checkpoint
    if getattr(original, "_megalora_hook", False):
        return original

    def save_checkpoint(iteration, *args, **kwargs):
        out = original(iteration, *args, **kwargs)
        root = save_root
        if root is None:
            from megatron.training import get_args

            root = get_args().lora_save
        if root:
            path = save_adapter(adapter_dir_for(root, int(iteration)))
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_rank() == 0:
                with open(os.path.join(root, "latest"), "w") as handle:
                    handle.write(os.path.basename(path))
        return out

    save_checkpoint._megalora_hook = True
    training.save_checkpoint = save_checkpoint
    return save_checkpoint
