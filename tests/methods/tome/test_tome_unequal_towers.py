"""Issue 24 item 10: ToMe's callback and mixin on a CLIP whose towers differ in depth.

The schedule used to expand r against the first tower's depth and set that one list on every
tower: a deeper second tower stopped merging where the first ended, and a shallower one
refused the list ("r has 4 entries but the tower has only 2 blocks"). Each tower must run
what ``apply_tome`` gives it: r expanded against its own depth.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import tiny_models
import torch

from vleff.backbones import find_towers, get_patch, token_counts
from vleff.callbacks import TokenMerging, TokenMergingMixin


def _clip(vision_layers: int, text_layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_models.open_clip_model(vision_layers=vision_layers, text_layers=text_layers).double().eval()


class Holder(pl.LightningModule):
    def __init__(self, clip: torch.nn.Module) -> None:
        super().__init__()
        self.clip = clip


class MixinHolder(TokenMergingMixin, pl.LightningModule):
    def __init__(self, clip: torch.nn.Module, **tome) -> None:
        super().__init__()
        self.clip = clip
        self.use_tome(**tome)


def _expected(r, depth: int, progress: float = 1.0) -> list[int]:
    """ToMe's r per block for one tower of ``depth`` blocks (the reference's ramp for a tuple),
    scaled by the warm-up's progress, each block rounded."""
    if isinstance(r, tuple):
        base, inflection = r
        first, last = base * (1 - inflection), base * (1 + inflection)
        full = [round(first + (last - first) * i / (depth - 1)) for i in range(depth)]
    else:
        full = [r] * depth
    return [round(v * progress) for v in full]


def _running(module: torch.nn.Module) -> dict[str, list[int]]:
    return {t.modality: list(get_patch(t.root).get_hook("tome").r_per_block) for t in find_towers(module)}


DEPTHS = [(4, 2), (2, 4)]  # the image tower deeper (ViT-L/14 beside a 12-block text tower), and the reverse


@pytest.mark.parametrize("vision_layers, text_layers", DEPTHS)
@pytest.mark.parametrize("r", [2, (2, 0.5)])
def test_callback_gives_each_tower_r_for_its_own_depth(vision_layers, text_layers, r):
    module = Holder(_clip(vision_layers, text_layers))
    callback = TokenMerging(r=r, towers="all", schedule="linear", warmup_steps=4)
    callback.setup(SimpleNamespace(global_step=2), module, "fit")  # half-way through the warm-up
    assert _running(module) == {"image": _expected(r, vision_layers, 0.5), "text": _expected(r, text_layers, 0.5)}
    callback.on_train_end(SimpleNamespace(global_step=4), module)
    assert _running(module) == {"image": _expected(r, vision_layers), "text": _expected(r, text_layers)}

    images = torch.randn(2, 3, tiny_models.IMG, tiny_models.IMG, dtype=torch.float64)
    with torch.no_grad():
        module.clip.encode_image(images)
    # the deeper image tower merges in every block: tokens entering block i = 17 - sum(r[:i])
    full = _expected(r, vision_layers)
    assert token_counts(module)["image"][:vision_layers] == [17 - sum(full[:i]) for i in range(vision_layers)]


@pytest.mark.parametrize("vision_layers, text_layers", DEPTHS)
def test_mixin_gives_each_tower_r_for_its_own_depth(vision_layers, text_layers):
    r = (2, 0.5)
    module = MixinHolder(_clip(vision_layers, text_layers), r=r, towers="all", schedule="linear", warmup_steps=4)
    assert _running(module) == {"image": _expected(r, vision_layers), "text": _expected(r, text_layers)}
    module._vleff_tome_at(1)
    assert _running(module) == {"image": _expected(r, vision_layers, 0.25), "text": _expected(r, text_layers, 0.25)}
