"""Every job config under configs/ loads, and its LoRA section builds a LoraConfig megalora accepts."""

from __future__ import annotations

import glob
import os

import pytest

from megalora import LoraConfig
from megalora.training import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_the_configs_are_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"smollm2_cpu.yaml", "smollm2_pissa.yaml", "smollm2_chat_tokens.yaml", "tiny_moe_cpu.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_its_lora_section_is_implemented(path):
    cfg = load(path)
    LoraConfig(**cfg.lora).raise_if_unimplemented()
