"""LoHa through peft: counts, exact start, the Hadamard formula, exact remove, refusals, the callback."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.loha import apply_loha, loha_parameters, remove_loha

C = 64
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def loha_count(r: int, shapes: list[tuple[int, int]]) -> int:
    """Two rank-``r`` pairs per ``(out, in)`` target: ``2·r·(in + out)``."""
    return sum(2 * r * (i + o) for o, i in shapes)


@pytest.mark.parametrize("family, tower", CASES)
def test_loha_starts_exactly_and_counts_its_parameters(family, tower):
    assert max_start_change(family, tower, lambda m: apply_loha(m, r=4)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_loha(model, r=4)
    shapes = [(3 * C, C)] * 3 if family == "timm_vit" else [(C, C)] * 3 * 4
    assert sum(p.numel() for p in loha_parameters(model)) == loha_count(4, shapes)


def test_loha_output_is_the_hadamard_formula_in_float64():
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    apply_loha(model, r=3, alpha=6.0)
    layer = model.blocks[2].attn.qkv
    with torch.no_grad():
        for p in loha_parameters(model):
            p.normal_()
        w1 = layer.hada_w1_a["default"] @ layer.hada_w1_b["default"]
        w2 = layer.hada_w2_a["default"] @ layer.hada_w2_b["default"]
        weight = layer.base_layer.weight + (6.0 / 3) * w1 * w2
        x = torch.randn(2, 5, C, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ weight.T + layer.base_layer.bias, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_loha_remove_restores_names_flags_and_state_exactly(family):
    def perturb(model):
        for p in loha_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, lambda m: apply_loha(m, r=2), remove_loha, perturb)


def test_loha_refusals_and_the_callback(tmp_path):
    with pytest.raises(ValueError, match="r=0"):
        vleff.callbacks.LoHa(r=0)
    with pytest.raises(TypeError, match=r"LoHa does not support open_clip text tower.*in_proj_weight"):
        apply_loha(tm.open_clip_model(), towers="text")
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.PEFT(method="loha", r=2)], max_steps=2)
    trainer.fit(module, tl.loader(8))
    w2b = module.model.blocks[0].attn.qkv.hada_w2_b["default"]
    assert not torch.equal(w2b, torch.zeros_like(w2b))  # trained
    assert {n.split(".")[-2] for n, p in module.named_parameters() if p.requires_grad and "hada_" in n} == {
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
    }
