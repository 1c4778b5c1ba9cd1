"""LoRA on ``nn.Embedding`` against HF PEFT's ``lora.Embedding``: outputs, gradients, merges and files.

The vocab-parallel layer is checked against world size 1 in
``test_embedding_parallel.py``; HF PEFT interop through the bridge in
``tests/hf/test_bridge.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.peft_oracle import assert_close, base_model, copy_adapters, megalora, peft, perturb, run

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class EmbNet(nn.Module):
    """An untied embedding (with a padding row) and a linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8, padding_idx=0)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.emb(x)))


def _base():
    torch.manual_seed(7)
    return EmbNet()


IDS = torch.tensor([[0, 3, 31, 3], [7, 1, 0, 30]])
CFG = dict(target_modules=["emb", "fc"], r=4, lora_alpha=8)


def _pair(**extra):
    kw = {**CFG, **extra}
    base = _base()
    p = peft.get_peft_model(_copy(base), peft.LoraConfig(**kw))
    m = megalora.get_peft_model(_copy(base), megalora.LoraConfig(**kw))
    return p, m


def _copy(module):
    import copy

    return copy.deepcopy(module)


def _sync(p, m):
    """Perturb PEFT's factors and load PEFT's own state dict (its in-memory keys) into megalora."""
    perturb(p)
    missing, unexpected = m.load_state_dict(p.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k], (missing, unexpected)


def test_init_matches_peft_scheme():
    _, m = _pair()
    layer = m.base_model.model.emb
    # PEFT: A zero and B ~ N(0, 1), so the adapter starts as the identity.
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    assert layer.lora_embedding_B["default"].std() > 0.3
    assert tuple(layer.lora_embedding_A["default"].shape) == (4, 32)
    assert tuple(layer.lora_embedding_B["default"].shape) == (8, 4)


def test_outputs_and_gradients_match_peft():
    p, m = _pair()
    _sync(p, m)
    out_p, out_m = p(IDS), m(IDS)
    assert_close(out_m, out_p, "embedding LoRA output")
    with m.disable_adapter():
        assert (m(IDS) - out_m).abs().max() > 1e-3, "the adapter must change the output"
    out_p.square().mean().backward()
    out_m.square().mean().backward()
    gp = {n.replace("lora_embedding_A.default", "lora_A.default.weight")
          .replace("lora_embedding_B.default", "lora_B.default.weight"): q.grad
          for n, q in p.named_parameters() if q.requires_grad}
    gm = {n: q.grad for n, q in m.named_parameters() if q.requires_grad}
    assert gp.keys() == gm.keys()
    for key in gm:
        assert_close(gm[key], gp[key], f"gradient of {key}")


def test_merge_unmerge_and_unload_match_peft():
    p, m = _pair()
    _sync(p, m)
    expected = p(IDS).detach()
    base = m.base_model.model.emb.get_base_layer().weight.detach().clone()
    assert_close(m.base_model.model.emb.get_delta_weight("default"),
                 p.base_model.model.emb.get_delta_weight("default"), "ΔW [vocab, dim]")
    p.merge_adapter()
    m.merge_adapter()
    assert_close(m.base_model.model.emb.get_base_layer().weight, p.base_model.model.emb.get_base_layer().weight,
                 "merged table")
    assert_close(m(IDS), expected, "merged output")
    m.unmerge_adapter()
    assert_close(m.base_model.model.emb.get_base_layer().weight, base, "unmerged table")
    plain = m.merge_and_unload()
    assert type(plain.emb) is nn.Embedding
    assert_close(plain(IDS), expected, "merge_and_unload")


def test_files_match_peft_both_ways(tmp_path):
    from safetensors.torch import load_file

    p, m = _pair()
    _sync(p, m)
    m.save_pretrained(tmp_path / "ours")
    p.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert "base_model.model.emb.lora_embedding_A" in ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    loaded_peft = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "ours"))
    loaded_ours = megalora.PeftModel.from_pretrained(_base(), str(tmp_path / "peft"))
    expected = m(IDS)
    assert_close(loaded_peft(IDS), expected, "PEFT loading megalora's file")
    assert_close(loaded_ours(IDS), expected, "megalora loading PEFT's file")


def test_tied_embedding_follows_peft_and_refuses_merge():
    """GPT-2 ties lm_head to wte: LoRA on wte changes the lookup only, never the head (as PEFT)."""
    kw = dict(target_modules=["wte"], r=4, lora_alpha=8, init_lora_weights=False)
    p = peft.get_peft_model(base_model("gpt2"), peft.LoraConfig(**kw))
    m = megalora.get_peft_model(base_model("gpt2"), megalora.LoraConfig(**kw))
    ps = p.state_dict()
    with torch.no_grad():
        for key, value in m.state_dict().items():
            if ".lora_" in key:
                ps[key.replace("lora_A.default.weight", "lora_embedding_A.default")
                   .replace("lora_B.default.weight", "lora_embedding_B.default")].copy_(value)
    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(0))
    assert_close(run(m, ids), run(p, ids), "tied GPT-2 logits")
    hf = m.base_model.model
    assert hf.lm_head.weight is hf.transformer.wte.get_base_layer().weight  # the head reads the base table
    with pytest.raises(ValueError, match="the output layer is tied to it"):
        m.merge_adapter()


@pytest.mark.parametrize("field", ["use_dora", "use_qalora", "lora_bias"])
def test_refused_options_name_the_field(field):
    with pytest.raises(ValueError, match=rf"{field}=True is not supported on the embedding emb"):
        megalora.get_peft_model(_base(), megalora.LoraConfig(**{**CFG, field: True, "qalora_group_size": 4}))


def test_all_linear_leaves_embeddings_out():
    m = megalora.get_peft_model(_base(), megalora.LoraConfig(target_modules="all-linear", r=2))
    assert type(m.base_model.model.emb) is nn.Embedding
