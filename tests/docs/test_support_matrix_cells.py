"""Support-matrix cells pinned on Hugging Face CLIP and BLIP (issue 12: 10).

* ``vleff.callbacks.TokenMerging`` in a Lightning fit of a small module wrapping the image tower
  (features + a linear head): every training step runs on merged tokens (the token counts the
  tower recorded) and the tower's weights train.
* One ``GaLoreAdamW`` step on the image tower: the group without projection equals
  ``torch.optim.AdamW``; a projected (square) weight equals the hand formula
  ``W(1 − lr·wd) − lr·scale·(R / (|R| + eps)) P`` with ``R = G Pᵀ``, ``P = Vh[:r]`` of ``G``.
* One ``MeZO`` step: ``θ − lr·g·z`` with ``z`` regenerated from the documented seed contract and
  ``g = (L(θ + εz) − L(θ − εz)) / 2ε`` computed here on a copy.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from torch import nn

from vleff.backbones import last_token_state

FAMILIES = ["hf_clip", "hf_blip"]


def _backbone(family: str) -> nn.Module:
    torch.manual_seed(0)
    return tm.hf_clip_model() if family == "hf_clip" else tm.hf_blip_retrieval()


def _features(family: str, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if family == "hf_clip":
        return backbone.get_image_features(pixel_values=x).pooler_output
    return backbone.vision_model(pixel_values=x).pooler_output


class FeatureClassifier(pl.LightningModule):
    def __init__(self, family: str) -> None:
        super().__init__()
        self.family = family
        self.backbone = _backbone(family)
        with torch.no_grad():
            dim = _features(family, self.backbone, tm.images(batch=1)).shape[-1]
        self.head = nn.Linear(dim, 10)
        self.counts: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(_features(self.family, self.backbone, x))
        self.counts.append(list(last_token_state(self.backbone).token_counts))
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_merging_callback_in_a_lightning_fit(family, tmp_path):
    from vleff.callbacks import TokenMerging

    module = FeatureClassifier(family)
    vision = [p.detach().clone() for p in module.backbone.vision_model.parameters()]
    trainer = tl.trainer(tmp_path, [TokenMerging(r=3)], max_steps=2)
    trainer.fit(module, tl.loader(8, batch_size=4))
    assert trainer.global_step == 2
    # 16 patches + cls; block 0 merges 3 -> block 1 sees 14 (both steps, training mode)
    assert module.counts == [[17, 14], [17, 14]], module.counts
    after = list(module.backbone.vision_model.parameters())
    assert sum(not torch.equal(a, b) for a, b in zip(vision, after)) > len(vision) // 2  # the tower trained


def _loss(family: str, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _features(family, backbone, x).square().mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_galore_step_on_hf_towers_by_hand(family):
    from vleff.memory.galore import GaLoreAdamW

    model = _backbone(family).eval()
    vision = model.vision_model
    square_name = (
        "encoder.layers.0.self_attn.q_proj.weight" if family == "hf_clip" else "encoder.layers.0.mlp.fc1.weight"
    )
    named = dict(vision.named_parameters())
    square = named[square_name]
    others = [p for n, p in named.items() if n != square_name]
    x = tm.images(seed=3)
    _loss(family, model, x).backward()
    start = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None}

    ref_others = [p.detach().clone().requires_grad_() for p in others]
    for p, q in zip(ref_others, others):
        p.grad = q.grad.clone()
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    torch.optim.AdamW(ref_others, **hyper).step()

    rank, scale = 4, 0.5
    opt = GaLoreAdamW([{"params": others}, {"params": [square], "rank": rank, "scale": scale}], **hyper)
    opt.step()
    for p, q in zip(others, ref_others):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=1e-6)

    g = grads[square_name].double()
    m, n = g.shape
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    if m >= n:  # right: R = G Pᵀ, P = Vh[:r]
        p_ = vh[:rank]
        r_ = g @ p_.T
        update = (r_ / (r_.abs() + hyper["eps"])) @ p_
    else:
        u, _, _ = torch.linalg.svd(g, full_matrices=False)
        p_ = u[:, :rank]
        r_ = p_.T @ g
        update = p_ @ (r_ / (r_.abs() + hyper["eps"]))
    w0 = start[square_name].double()
    expected = w0 * (1 - hyper["lr"] * hyper["weight_decay"]) - hyper["lr"] * scale * update
    assert (expected - w0).abs().max() > 1e-3  # the step is visible
    torch.testing.assert_close(square.detach().double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mezo_step_on_hf_towers_by_hand(family):
    from vleff.memory.mezo import MeZO

    model = _backbone(family).eval()
    vision = model.vision_model
    params = [p for p in vision.parameters() if p.requires_grad]
    x = tm.images(seed=4)
    lr, eps, seed = 0.05, 1e-3, 11
    start = [p.detach().clone() for p in params]

    # the direction contract: one CPU generator seeded with seed + step, randn per parameter in order
    gen = torch.Generator().manual_seed(seed)
    z = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    ref = copy.deepcopy(model)
    ref_params = [p for p in ref.vision_model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, p0, zi in zip(ref_params, start, z):
            p.copy_(torch.add(p0, zi, alpha=eps))
        loss_plus = _loss(family, ref, x).double()
        for p, p0, zi in zip(ref_params, start, z):
            p.copy_(torch.add(p0, zi, alpha=-eps))
        loss_minus = _loss(family, ref, x).double()
    g = (loss_plus - loss_minus) / (2 * eps)

    opt = MeZO(params, lr=lr, eps=eps, seed=seed)
    with torch.no_grad():
        opt.step(lambda: _loss(family, model, x))
    torch.testing.assert_close(opt.last_projected_grad.double(), g, rtol=2e-3, atol=1e-6)
    moved = 0
    for p, p0, zi in zip(params, start, z):
        delta = p.detach().double() - p0.double()
        torch.testing.assert_close(delta, -lr * float(g) * zi.double(), atol=2e-6, rtol=5e-3)
        moved += int((delta.abs() > 1e-5).any())
    assert moved == len(params)
