"""Shared helpers for the tests that use HF PEFT as the oracle on plain layers.

Each test builds one small deterministic model, wraps a deep copy with PEFT and
another with megalora from identical configs, perturbs megalora's adapter
parameters with a fixed seed (B starts at zero), copies them into the PEFT
model by name (the state-dict keys are the same) and compares.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import megalora  # noqa: E402

ATOL = 1e-6
LINEAR_TARGETS = ["q", "k", "v", "fc1", "fc2"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]

# PEFT (and megalora, which mirrors it) warn about fan_in_fan_out, unmerging
# twice and the like: each test module silences UserWarning with ``pytestmark``.


# ---------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + torch.tanh(self.q(x)) * self.k(x) + self.v(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyNet(nn.Module):
    """A stack of ``layers`` (a ``ModuleList``) of plain ``nn.Linear`` blocks."""

    def __init__(self, d_in: int = 6, d: int = 8, n_layers: int = 3, d_out: int = 5):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@functools.lru_cache(maxsize=None)
def _base(kind: str) -> nn.Module:
    torch.manual_seed(1234)
    if kind == "net":
        model = TinyNet()
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def base_model(kind: str) -> nn.Module:
    """A fresh copy of the cached deterministic base model of ``kind``."""
    return copy.deepcopy(_base(kind))


def make_input(kind: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "net":
        return torch.randn(3, 4, 6, generator=gen)
    return torch.randint(0, 32, (2, 7), generator=gen)


def run(model: nn.Module, inp: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The model's output; the global RNG is reseeded first, so dropout masks agree."""
    torch.manual_seed(seed)
    out = model(inp) if inp.is_floating_point() else model(input_ids=inp)
    return out if isinstance(out, torch.Tensor) else out.logits


# ---------------------------------------------------------------------- pairs


def is_adapter_key(key: str) -> bool:
    return ".lora_" in key or ".modules_to_save." in key


def build_pair(kind: str, adapters, active=None):
    """``(peft model, megalora model)`` on copies of one base, with the same adapters.

    Args:
        adapters: ``[(name, config kwargs), ...]``; the first creates the model.
        active: Adapter name or list to activate in both (on the ``LoraModel``,
            since PEFT's ``PeftModel.set_adapter`` only takes one name).
    """
    (first, kw), rest = adapters[0], adapters[1:]
    p = peft.get_peft_model(base_model(kind), peft.LoraConfig(**kw), adapter_name=first)
    m = megalora.get_peft_model(base_model(kind), megalora.LoraConfig(**kw), adapter_name=first)
    for name, kw in rest:
        p.add_adapter(name, peft.LoraConfig(**kw))
        m.add_adapter(name, megalora.LoraConfig(**kw))
    if active is not None:
        p.base_model.set_adapter(active)
        m.base_model.set_adapter(active)
    return p, m


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Give every adapter parameter a non-trivial, seeded value (B starts at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not is_adapter_key(name):
            continue
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * noise)
        elif ".modules_to_save." in name:
            param.add_(0.1 * noise)
        else:
            param.copy_(scale * noise)


@torch.no_grad()
def copy_adapters(src: nn.Module, dst: nn.Module) -> None:
    """Copy every adapter tensor of ``src`` into ``dst``; the key sets must be equal."""
    s, d = src.state_dict(), dst.state_dict()
    s_keys = {k for k in s if is_adapter_key(k)}
    d_keys = {k for k in d if is_adapter_key(k)}
    assert s_keys == d_keys, f"adapter keys differ: only src {s_keys - d_keys}, only dst {d_keys - s_keys}"
    for key in s_keys:
        d[key].copy_(s[key])


def synced_pair(kind: str, adapters, active=None, seed: int = 0):
    """:func:`build_pair`, then perturb megalora's adapters and copy them into PEFT's."""
    p, m = build_pair(kind, adapters, active)
    perturb(m, seed)
    copy_adapters(m, p)
    return p, m


def assert_close(actual, expected, msg: str = "", atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{msg}: {m}")


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA layer (PEFT's or megalora's) by module name."""
    return {n: mod for n, mod in model.named_modules() if isinstance(getattr(mod, "lora_A", None), nn.ModuleDict)}


def targeted(model: nn.Module) -> set[str]:
    return set(lora_layers(model))


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every non-adapter tensor (base weights and biases)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_adapter_key(k)}


def assert_states_close(actual: dict, expected: dict, msg: str, atol: float = ATOL) -> None:
    assert set(actual) == set(expected), f"{msg}: keys differ {set(actual) ^ set(expected)}"
    for key in expected:
        assert_close(actual[key], expected[key], f"{msg} [{key}]", atol=atol)


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(n, type(mod)) for n, mod in model.named_modules()]
