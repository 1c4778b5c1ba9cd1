"""PEFT-format adapters saved at one TP/PP/VPP layout and loaded at another.

Oracle: the same reference weights at both layouts, the same adapter (moved
away from its init by layout-invariant noise); the logits after loading must
equal the logits where the adapter was saved, and the loaded tensors must equal
the file's bit for bit. HF PEFT reading a plain model's adapter is covered by
tests/test_peft_model.py::test_save_load_both_directions.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests import io_utils as U

# Modules trained whole on the last stage only: one TP-sharded, one replicated.
SAVED_MODULES = ["output_layer", "final_layernorm"]
DORA = dict(r=2, lora_alpha=4, use_dora=True, target_modules=["linear_proj", "linear_fc1"])


def _file_tensors(path: str) -> dict:
    from megalora.checkpoint import read_adapter_tensors

    return read_adapter_tensors(path)


def _save_tp2pp2_body(path: str):
    import megalora
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    peft = megalora.get_peft_model(U.build(full, tp=2, pp=2), U.lora_config(modules_to_save=SAVED_MODULES))
    peft.add_adapter("dora", U.lora_config(**DORA))
    for adapter in ("default", "dora"):
        U.perturb(peft, adapter)
    saved_logits = {}
    for adapter in ("default", "dora"):
        peft.set_adapter(adapter)
        saved_logits[adapter] = U.pipeline_logits(peft.get_base_model())
    peft.save_pretrained(path)
    destroy_parallel()

    # World size 1 layout (the 4 ranks are plain replicas).
    fresh = megalora.get_peft_model(U.build(full), U.lora_config(modules_to_save=SAVED_MODULES))
    fresh_logits = U.pipeline_logits(fresh.get_base_model())
    destroy_parallel()
    loaded = megalora.PeftModel.from_pretrained(U.build(full), path)
    loaded.load_adapter(os.path.join(path, "dora"), adapter_name="dora")
    frozen = all(not p.requires_grad for p in loaded.parameters())
    out = {"default": U.pipeline_logits(loaded.get_base_model())}
    loaded.set_adapter("dora")
    out["dora"] = U.pipeline_logits(loaded.get_base_model())
    for adapter, sub in (("default", ""), ("dora", "dora")):
        file = _file_tensors(os.path.join(path, sub))
        mine = U.gathered(loaded, adapter)
        assert file.keys() == mine.keys(), sorted(file.keys() ^ mine.keys())[:4]
        for key in file:
            assert torch.equal(file[key], mine[key]), f"{adapter}: {key} changed on load"
        U.assert_close(saved_logits[adapter], out[adapter], 1e-5, f"adapter {adapter}: TP2xPP2 vs TP1 logits")
    moved = (fresh_logits - saved_logits["default"]).abs().max().item()
    return sorted(file), frozen, moved


def test_save_tp2_pp2_load_tp1(dist4, tmp_path):
    path = str(tmp_path / "adapter")
    results = dist4(_save_tp2pp2_body, path, timeout_s=600)
    keys, frozen, moved = results[0]
    assert all(r[:2] == (keys, frozen) for r in results)
    assert frozen, "is_trainable=False must load a frozen adapter"
    assert moved > 1e-3, "the saved adapter must change the logits, or the oracle proves nothing"
    files = _file_tensors(path)
    # Global names: stage 1's local layer 0 is layer 2, and the last stage's saved modules are there.
    assert "base_model.model.decoder.layers.3.mlp.linear_fc1.lora_B.weight" in files
    assert files["base_model.model.decoder.layers.3.mlp.linear_fc1.lora_B.weight"].shape == (2 * 96, 4)
    assert files["base_model.model.output_layer.weight"].shape == (128, 64)
    assert "base_model.model.decoder.final_layernorm.weight" in files
    dora = _file_tensors(str(tmp_path / "adapter" / "dora"))
    assert dora["base_model.model.decoder.layers.0.mlp.linear_fc1.lora_magnitude_vector"].shape == (192,)
    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), "pt") as handle:
        meta = handle.metadata()
    layout = json.loads(meta["megalora_layout"])
    assert layout["tensor_model_parallel_size"] == 2 and layout["pipeline_model_parallel_size"] == 2
    assert meta["megalora_version"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["inference_mode"] is True
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]


def _save_tp1_body(path: str):
    import megalora
    from megalora.parallel_start import destroy_parallel

    full = U.reference_weights()
    peft = megalora.get_peft_model(U.build(full), U.lora_config(modules_to_save=SAVED_MODULES))
    U.perturb(peft, "default")
    saved = U.pipeline_logits(peft.get_base_model())
    peft.save_pretrained(path)
    destroy_parallel()
    diffs = {}
    for name, layout in (("tp2", dict(tp=2)), ("tp2-pp2-vpp2", dict(tp=2, pp=2, vpp=2))):
        loaded = megalora.PeftModel.from_pretrained(U.build(full, **layout), path, is_trainable=True)
        logits = U.pipeline_logits(loaded.get_base_model())
        U.assert_close(saved, logits, 1e-5, f"TP1 vs {name} logits")
        mine = U.gathered(loaded)
        file = _file_tensors(path)
        assert file.keys() == mine.keys() and all(torch.equal(file[k], mine[k]) for k in file), name
        trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), name
        diffs[name] = (saved - logits).abs().max().item()
        destroy_parallel()
    return diffs


def test_save_tp1_load_tp2_and_vpp(dist4, tmp_path):
    results = dist4(_save_tp1_body, str(tmp_path / "adapter"), timeout_s=600)
    assert set(results[0]) == {"tp2", "tp2-pp2-vpp2"}


# ---------------------------------------------------------------------- mismatches


def _edit_adapter(src: str, dst: str, config=None, drop=(), reshape=None, truncate=False, pickle_only=False):
    """A copy of a saved adapter with one thing broken, as a user's hand edit or a bad copy would."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    weights, config_path = os.path.join(dst, "adapter_model.safetensors"), os.path.join(dst, "adapter_config.json")
    if config:
        data = json.loads(open(config_path).read())
        data.update(config)
        open(config_path, "w").write(json.dumps(data))
    if drop or reshape:
        tensors = {k: v for k, v in _file_tensors(dst).items() if not any(d in k for d in drop)}
        for key, shape in (reshape or {}).items():
            tensors[key] = torch.zeros(shape)
        save_file(tensors, weights)
    if truncate:
        blob = open(weights, "rb").read()
        open(weights, "wb").write(blob[: len(blob) // 2])
    if pickle_only:
        os.replace(weights, os.path.join(dst, "adapter_model.bin"))


BAD = {
    # Global layer 3 lives on stage 1 only: stage 0 finds nothing wrong by itself.
    "missing": dict(drop=["layers.3.mlp.linear_fc1"]),
    "unexpected": dict(config={"target_modules": ["linear_qkv", "linear_proj", "linear_fc1"]}),
    "r": dict(config={"r": 8}),
    "shape": dict(reshape={"base_model.model.decoder.layers.0.mlp.linear_fc1.lora_B.weight": (100, 4)}),
    "megatron_core": dict(config={"megatron_core": "os"}),
    "pickle": dict(pickle_only=True),
    "torn": dict(truncate=True),
}


def _errors_body(root: str):
    import torch.distributed as dist

    import megalora
    from megalora.layers import LoraLayer

    full = U.reference_weights(gated=False)
    model = U.build(full, pp=2, gated=False)
    peft = megalora.get_peft_model(model, U.lora_config())
    U.perturb(peft, "default")
    good = os.path.join(root, "good")
    peft.save_pretrained(good)
    messages = {}
    for case, call in (("safe_serialization", dict(safe_serialization=False)),
                       ("selected", dict(selected_adapters=["nope"]))):
        try:
            peft.save_pretrained(os.path.join(root, case), **call)
        except ValueError as exc:
            messages[f"save-{case}"] = str(exc)
    base = peft.unload()
    if dist.get_rank() == 0:
        for case, edit in BAD.items():
            _edit_adapter(good, os.path.join(root, case), **edit)
    dist.barrier()
    for case in BAD:
        try:
            megalora.PeftModel.from_pretrained(base, os.path.join(root, case))
        except (ValueError, FileNotFoundError) as exc:
            messages[case] = str(exc)
        assert not any(isinstance(m, LoraLayer) for m in base.modules()), f"{case}: the base model kept LoRA layers"
    loaded = megalora.PeftModel.from_pretrained(base, good)
    try:
        loaded.load_adapter(os.path.join(root, "r"), adapter_name="other")
    except ValueError as exc:
        messages["load_adapter-r"] = str(exc)
    leftovers = [n for n, _ in loaded.named_parameters() if ".other." in n]
    assert "other" not in loaded.peft_config and not leftovers, "a failed load_adapter left its adapter behind"
    return messages


EXPECTED = {
    "save-safe_serialization": "only safetensors",
    "save-selected": "do not exist",
    "missing": "missing tensor base_model.model.decoder.layers.3.mlp.linear_fc1.lora_A.weight",
    "unexpected": "match no module",
    "r": "different r",
    "shape": "shape mismatch for base_model.model.decoder.layers.0.mlp.linear_fc1.lora_B.weight",
    "megatron_core": "megatron_core='os' is not allowed",
    "pickle": "pickle files are never read",
    "torn": "cannot read the adapter tensors",
    "load_adapter-r": "different r",
}


def test_every_mismatch_raises_the_same_clear_error_on_every_rank(dist2, tmp_path):
    per_rank = dist2(_errors_body, str(tmp_path), timeout_s=600)
    assert per_rank[0] == per_rank[1], "the ranks raised different errors"
    messages = per_rank[0]
    assert set(messages) == set(EXPECTED), f"no error for {set(EXPECTED) - set(messages)}"
    for case, text in EXPECTED.items():
        assert text in messages[case], f"{case}: {messages[case]}"
    assert "r=4" in messages["r"] and "r=8" in messages["r"]


# ---------------------------------------------------------------------- kill during save


_CHILD = r"""
import os, shutil, sys, time
import torch
from torch import nn
import megalora
from megalora import atomic_write

point, path = sys.argv[1], sys.argv[2]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.fc1 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 32)


torch.manual_seed(0)
model = megalora.get_peft_model(Net(), megalora.LoraConfig(r=4, target_modules=["q", "v", "fc1"],
                                                           init_lora_weights=False))
model.save_pretrained(path)
shutil.copytree(path, path + "-v1")
with torch.no_grad():
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.add_(1.0)
atomic_write._WRITE_CHUNK = 64  # many small writes, so that one can stop half-way
calls = {"write": 0, "replace": 0}
real_write, real_replace = os.write, os.replace


def block():
    print("BLOCKED", flush=True)
    time.sleep(3600)


def write(fd, data):
    calls["write"] += 1
    if point == "mid-write" and calls["write"] == 3:
        block()
    return real_write(fd, data)


def replace(src, dst):
    calls["replace"] += 1
    if (point, calls["replace"]) in (("before-rename", 1), ("between-renames", 2)):
        block()
    return real_replace(src, dst)


os.write, os.replace = write, replace
model.save_pretrained(path)
print("FINISHED", flush=True)
"""


def _net():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.v, self.fc1 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 32)

    return Net()


@pytest.mark.parametrize("point", ["mid-write", "before-rename", "between-renames"])
def test_sigkill_during_save_keeps_an_adapter_loadable(tmp_path, point):
    import signal
    import subprocess
    import sys
    import threading

    import megalora

    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    path = str(tmp_path / "adapter")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, str(script), point, path], stdout=subprocess.PIPE, text=True, env=env)
    guard = threading.Timer(300, child.kill)  # a hung child must not hang the suite
    guard.start()
    try:
        lines = []
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() == "BLOCKED":
                os.kill(child.pid, signal.SIGKILL)
                break
        child.wait()
    finally:
        guard.cancel()
    assert lines and lines[-1] == "BLOCKED", f"the child never reached the kill point: {lines}"
    assert child.returncode == -signal.SIGKILL

    v1 = _file_tensors(path + "-v1")
    got = _file_tensors(path)
    if point == "between-renames":
        # The new tensors are in place, the config is the (identical) old one.
        assert all(torch.equal(got[k], v1[k] + 1.0) for k in v1)
    else:
        assert all(torch.equal(got[k], v1[k]) for k in v1), "the previous adapter was overwritten"
        assert [n for n in os.listdir(path) if n.endswith(".tmp")], "the kill did not land inside the save"
    loaded = megalora.PeftModel.from_pretrained(_net(), path)
    mine = {k.replace(".default", ""): v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert mine.keys() == got.keys() and all(torch.equal(mine[k], got[k]) for k in got)
    # The next save clears what the killed one left behind.
    loaded.save_pretrained(path)
    assert not [n for n in os.listdir(path) if n.endswith(".tmp")]

