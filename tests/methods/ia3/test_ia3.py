"""IA3 through peft: one vector per target of the right size, exact start, the paper's formula,
exact remove, refusals, the callback."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.ia3 import apply_ia3, ia3_parameters, remove_ia3

C = 64
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def ia3_count(attention_outs: list[int], mlp_hidden: list[int]) -> int:
    """One scale per output of every attention input projection, one per hidden unit of every MLP."""
    return sum(attention_outs) + sum(mlp_hidden)


@pytest.mark.parametrize("family, tower", CASES)
@pytest.mark.parametrize("mlp", [True, False])
def test_ia3_starts_exactly_and_has_one_vector_per_target(family, tower, mlp):
    assert max_start_change(family, tower, lambda m: apply_ia3(m, mlp=mlp)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_ia3(model, mlp=mlp)
    if family == "timm_vit":  # 3 blocks: fused qkv (3C outputs), MLP hidden 4C
        expected = ia3_count([3 * C] * 3, [4 * C] * 3 if mlp else [])
    else:  # 2 + 2 blocks: q, k, v (C outputs each), MLP hidden 128
        expected = ia3_count([C] * 3 * 4, [128] * 4 if mlp else [])
    params = ia3_parameters(model)
    assert sum(p.numel() for p in params) == expected
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)  # vectors start at one


def test_ia3_output_is_the_papers_formula_in_float64():
    """Attention input projection: ``l ⊙ (W x + b)``; MLP output layer: ``W (l ⊙ h) + b``."""
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    apply_ia3(model)
    qkv, fc2 = model.blocks[0].attn.qkv, model.blocks[0].mlp.fc2
    with torch.no_grad():
        for p in ia3_parameters(model):
            p.normal_()
        x, h = torch.randn(2, 5, C, dtype=torch.float64), torch.randn(2, 5, 4 * C, dtype=torch.float64)
        lq, lf = qkv.ia3_l["default"].flatten(), fc2.ia3_l["default"].flatten()
        base_q, base_f = qkv.base_layer, fc2.base_layer
        torch.testing.assert_close(qkv(x), lq * (x @ base_q.weight.T + base_q.bias), atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(fc2(h), (lf * h) @ base_f.weight.T + base_f.bias, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_ia3_remove_restores_names_flags_and_state_exactly(family):
    def perturb(model):
        for p in ia3_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, apply_ia3, remove_ia3, perturb)


def test_ia3_refusals_name_the_setting_the_tower_and_what_is_supported():
    with pytest.raises(ValueError, match="mlp='yes'"):
        vleff.callbacks.IA3(mlp="yes")
    with pytest.raises(TypeError, match=r"IA3 does not support open_clip image tower.*in_proj_weight"):
        apply_ia3(tm.open_clip_model(), towers="image")
    model = tm.timm_vit()
    vleff.apply_dora(model, r=2)
    with pytest.raises(ValueError, match="cannot apply ia3 while dora is applied"):
        apply_ia3(model)


def test_ia3_callback_trains_only_the_vectors(tmp_path):
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.IA3()], max_steps=3)
    trainer.fit(module, tl.loader(8))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.named_parameters() if ".ia3_l." in n or n.startswith("model.head.")}
    fc2 = module.model.blocks[0].mlp.fc2.ia3_l["default"]
    assert not torch.equal(fc2, torch.ones_like(fc2))
