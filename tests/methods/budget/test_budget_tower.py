"""A budget of one tower of an image-text model: ``fit_budget(..., tower="image")`` and the
callbacks' ``budget_tower="image"``.

Checked against an independent count: the FLOPs of open_clip's image tower worked out from its
shapes and the token counts each block ran on (equal to vleff's counter at a fixed ``r``, asserted
first), so the fitted ratio is the image tower's, not the whole model's (which the untouched text
tower would pull towards 1).
"""

from __future__ import annotations

import math

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from torch.utils.data import DataLoader, TensorDataset

import vleff
from vleff.backbones import last_token_state, token_counts
from vleff.budget import fit_budget, tower_forward
from vleff.flops import count_flops

W, DEPTH, HEAD_WIDTH, PATCH, IMG, EMBED = 64, 4, 16, 8, 64, 32
PATCHES = (IMG // PATCH) ** 2


def clip():
    """An open_clip CLIP with 65 image tokens (fine ToMe steps) and 4 blocks per image tower."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=DEPTH, width=W, head_width=HEAD_WIDTH, patch_size=PATCH, image_size=IMG)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=W, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=EMBED, vision_cfg=vision, text_cfg=text).eval()


def batch(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
    return images, tm.token_ids(batch=n, seed=seed)


def analytic_image_flops(model, n: int) -> int:
    """The image tower's FLOPs from its shapes and the token counts of its latest forward."""
    counts = token_counts(model).get("image", [PATCHES + 1] * DEPTH)
    state = last_token_state(model)
    after = [*counts[1:], state.num_tokens if state is not None else PATCHES + 1]
    f = 2 * PATCHES * (3 * PATCH * PATCH) * W + 2 * W * EMBED  # patch embedding, projection of the pooled token
    for tokens, kept in zip(counts, after):
        f += 8 * tokens * W * W + 4 * tokens * tokens * W + 16 * kept * W * W  # qkv + out, attention, MLP
        if kept < tokens:  # ToMe's bipartite matching of the keys (head mean), a·bᵀ
            f += 2 * math.ceil(tokens / 2) * (tokens // 2) * HEAD_WIDTH
    return n * f


def image_ratio(model, plain: int, b) -> float:
    with torch.no_grad():
        model.encode_image(b[0])
    return analytic_image_flops(model, b[0].shape[0]) / plain


def test_the_independent_count_equals_the_counter():
    model, b = clip(), batch()
    assert count_flops(lambda: model.encode_image(b[0])) == analytic_image_flops(model, 2)
    vleff.apply_tome(model, r=[5, 3, 0, 7], towers="image")
    with torch.no_grad():
        model.encode_image(b[0])
    assert count_flops(lambda: model.encode_image(b[0])) == analytic_image_flops(model, 2)


@pytest.mark.parametrize("target", [0.6])
def test_fit_budget_of_the_image_tower_lands_within_two_percent_by_the_independent_count(target):
    model, b = clip(), batch()
    plain = analytic_image_flops(model, 2)
    vleff.apply_tome(model, r=0, towers="image")
    fit = fit_budget(model, [b], flops=target, tower="image")
    ratio = image_ratio(model, plain, b)
    assert abs(ratio - target) <= 0.02 * target
    assert fit.ratio == pytest.approx(ratio, rel=1e-12)
    # the whole model (text tower untouched) misses the target: the tower budget is not it
    assert vleff.budget.measure_ratio(model, [b]) > target * 1.02


class CLIPModule(tl.TinyCLIP):
    def __init__(self) -> None:
        super().__init__()
        self.model = clip().train()


def _loader() -> DataLoader:
    images, ids = batch(4, seed=1)
    return DataLoader(TensorDataset(images, ids), batch_size=4)


@pytest.mark.parametrize(
    "name, cls, settings",
    [("tome", "TokenMerging", {"r": 0}), ("evit", "EViT", {"keep_rate": 1.0, "locations": [1], "end_epoch": 0})],
)
def test_the_callbacks_budget_tower_fits_the_image_tower(name, cls, settings, tmp_path):
    torch.manual_seed(0)
    callback = getattr(vleff.callbacks, cls)(
        **settings, towers="image", flops_target=0.6, budget_batches=1, budget_tower="image"
    )
    module = CLIPModule()
    plain = analytic_image_flops(clip(), 4)
    loader = _loader()
    tl.trainer(tmp_path, [callback], max_steps=1, max_epochs=-1).fit(module, loader)
    assert callback.budget_settings is not None and callback.budget_state()["budget_tower"] == "image"
    module.model.eval()
    if name == "tome":  # the independent count covers ToMe's matching
        assert abs(image_ratio(module.model, plain, next(iter(loader))) - 0.6) <= 0.02 * 0.6
    ratio = vleff.budget.measure_ratio(module.model, [next(iter(loader))], method=name, forward=tower_forward("image"))
    assert abs(ratio - 0.6) <= 0.02 * 0.6


def test_a_checkpoint_of_another_budget_tower_is_fitted_again():
    first = vleff.callbacks.TokenMerging(r=0, flops_target=0.6, budget_tower="image")
    first.budget_settings = {"r": 3}
    state = first.budget_state()
    same = vleff.callbacks.TokenMerging(r=0, flops_target=0.6, budget_tower="image")
    same.load_budget_state(state)
    assert same.budget_settings == {"r": 3}
    whole = vleff.callbacks.TokenMerging(r=0, flops_target=0.6)
    whole.load_budget_state(state)
    assert whole.budget_settings is None


def test_bad_towers_and_models_get_a_clear_error():
    with pytest.raises(ValueError, match=r"budget_tower='vision' is not allowed; use one of \('image', 'text'\)"):
        vleff.callbacks.DynamicViT(flops_target=0.5, budget_tower="vision")
    with pytest.raises(ValueError, match=r"tower='both' is not allowed"):
        fit_budget(clip(), [batch()], flops=0.5, tower="both")
    model = clip()
    vleff.apply_tome(model, r=0, towers="image")
    with pytest.raises(ValueError, match="tower='image' and forward= both"):
        fit_budget(model, [batch()], flops=0.5, tower="image", forward=tower_forward("image"))
    vit = tm.timm_vit().eval()
    vleff.apply_tome(vit, r=0)
    with pytest.raises(TypeError, match="tower='image' counts one tower of an image-text model.*holds no image-text"):
        fit_budget(vit, [tm.images()], flops=0.5, tower="image")
    with pytest.raises(TypeError, match=r"tower='image' needs \(images, token_ids"):
        fit_budget(model, [batch()[0]], flops=0.5, tower="image")
