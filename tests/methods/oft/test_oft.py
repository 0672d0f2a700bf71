"""OFT through peft: counts, exact start, the weight turned by an orthogonal block-diagonal matrix
(exactly orthogonal with the paper's Cayley transform, only approximately with peft's Neumann
series), exact remove, refusals, the callback."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.oft import apply_oft, oft_parameters, remove_oft

C = 64
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def oft_count(block: int, inp: int) -> int:
    """One skew-symmetric block per ``block`` input features: ``block·(block − 1)/2`` each."""
    return (inp // block) * block * (block - 1) // 2


def test_vit_b16_counts_are_the_documented_ones():
    """Block 16 on ViT-B/16's qkv: 69,120 (METHODS-next's probe); block 32 (the default): 142,848."""
    assert 12 * oft_count(16, 768) == 69_120
    assert 12 * oft_count(32, 768) == 142_848


@pytest.mark.parametrize("family, tower", CASES)
def test_oft_starts_exactly_and_counts_its_parameters(family, tower):
    assert max_start_change(family, tower, lambda m: apply_oft(m, block_size=16)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_oft(model, block_size=16)
    targets = 3 if family == "timm_vit" else 3 * 4
    assert sum(p.numel() for p in oft_parameters(model)) == targets * oft_count(16, C)


def _rotation(layer: torch.nn.Module) -> torch.Tensor:
    """``R`` with ``W' = W₀ R``, read from the layer's own outputs: ``W' = (layer(I) − b)ᵀ``, then the
    least-squares solution of ``W₀ R = W'`` (``W₀`` has full column rank)."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    effective = (layer(eye) - layer.base_layer.bias).T
    return torch.linalg.lstsq(layer.base_layer.weight, effective).solution


@pytest.mark.parametrize("neumann", [False, True])
def test_oft_turns_the_weight_by_a_block_diagonal_rotation(neumann):
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    apply_oft(model, block_size=16, cayley_neumann=neumann)
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        for p in oft_parameters(model):
            p.normal_(std=0.3)
        rotation = _rotation(layer)
    blocks = torch.block_diag(*[torch.ones(16, 16, dtype=torch.float64)] * (C // 16))
    assert rotation.mul(1 - blocks).abs().max() < 1e-9  # nothing outside the diagonal blocks
    error = (rotation.T @ rotation - torch.eye(C, dtype=torch.float64)).abs().max()
    if neumann:
        assert error > 1e-3  # peft's series is only approximately orthogonal this far from I
    else:
        assert error < 1e-9  # the Cayley transform is orthogonal


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_oft_remove_restores_names_flags_and_state_exactly(family):
    def perturb(model):
        for p in oft_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, lambda m: apply_oft(m, block_size=16), remove_oft, perturb)


def test_oft_refusals_and_the_callback(tmp_path):
    with pytest.raises(ValueError, match="block_size=1"):
        vleff.callbacks.OFT(block_size=1)
    with pytest.raises(ValueError, match=r"block_size=24 is not allowed here.*\[64\]"):
        apply_oft(tm.timm_vit(), block_size=24)
    with pytest.raises(TypeError, match=r"OFT does not support open_clip text tower.*in_proj_weight"):
        apply_oft(tm.open_clip_model(), towers="text")
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.PEFT(method="oft", block_size=16)], max_steps=2)
    trainer.fit(module, tl.loader(8))
    trained = [p for n, p in module.named_parameters() if p.requires_grad and "oft_" in n]
    assert trained and all(p.abs().max() > 0 for p in trained)  # trained away from S = 0
