"""LoKr through peft: counts from the nearest-square factor pairs, exact start, the Kronecker
formula in float64, exact remove, refusals, the callback."""

from __future__ import annotations

import math

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.lokr import apply_lokr, lokr_parameters, remove_lokr

C = 64
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def near_square(d: int) -> tuple[int, int]:
    """``d = a·b`` with ``a ≤ b`` and ``a`` the largest divisor not above ``√d``."""
    a = max(k for k in range(1, math.isqrt(d) + 1) if d % k == 0)
    return a, d // a


def lokr_count(r: int, out: int, inp: int) -> int:
    """``W1: out_a × in_a`` in full; ``W2: out_b × in_b`` as a rank-``r`` product unless ``r`` is at
    least half its larger side (then in full)."""
    (oa, ob), (ia, ib) = near_square(out), near_square(inp)
    second = ob * ib if r >= max(ob, ib) / 2 else r * (ob + ib)
    return oa * ia + second


def test_vit_b16_count_is_the_documented_one():
    """1,792 per qkv (2304 x 768) at r = 8: 21,504 on ViT-B/16's 12 blocks (METHODS-next's probe)."""
    assert 12 * lokr_count(8, 2304, 768) == 21_504


@pytest.mark.parametrize("family, tower", CASES)
def test_lokr_starts_exactly_and_counts_its_parameters(family, tower):
    assert max_start_change(family, tower, lambda m: apply_lokr(m, r=2)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_lokr(model, r=2)
    shapes = [(3 * C, C)] * 3 if family == "timm_vit" else [(C, C)] * 3 * 4
    assert sum(p.numel() for p in lokr_parameters(model)) == sum(lokr_count(2, o, i) for o, i in shapes)


@settings(max_examples=10, deadline=None)
@given(r=st.integers(1, 5), alpha=st.floats(0.5, 8.0), seed=st.integers(0, 1000))
def test_lokr_output_is_the_kronecker_formula_in_float64(r, alpha, seed):
    torch.manual_seed(seed)
    model = tm.timm_vit().double().eval()
    apply_lokr(model, r=r, alpha=alpha)
    layer = model.blocks[1].attn.qkv
    with torch.no_grad():
        for p in lokr_parameters(model):
            p.normal_()
        w2 = layer.lokr_w2_a["default"] @ layer.lokr_w2_b["default"]  # r < 8: the 16 x 8 factor as a product
        weight = layer.base_layer.weight + (alpha / r) * torch.kron(layer.lokr_w1["default"], w2)
        x = torch.randn(2, 5, C, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ weight.T + layer.base_layer.bias, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_lokr_remove_restores_names_flags_and_state_exactly(family):
    def perturb(model):
        for p in lokr_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, lambda m: apply_lokr(m, r=2), remove_lokr, perturb)


def test_lokr_refusals_and_the_callback(tmp_path):
    with pytest.raises(ValueError, match="r=0"):
        vleff.callbacks.LoKr(r=0)
    with pytest.raises(TypeError, match=r"LoKr does not support open_clip text tower.*in_proj_weight"):
        apply_lokr(tm.open_clip_model(), towers="text")
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.PEFT(method="lokr", r=2)], max_steps=2)
    trainer.fit(module, tl.loader(8))
    trained = {n.split(".")[-2] for n, p in module.named_parameters() if p.requires_grad and "lokr_" in n}
    assert trained == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    w1 = module.model.blocks[0].attn.qkv.lokr_w1["default"]
    assert w1.abs().max() > 0  # trained away from its zero start
