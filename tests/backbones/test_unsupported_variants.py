"""Models outside the support list are refused when a method is applied, not at the first forward
(issue 30, point 4): open_clip's CoCa text tower, an open_clip CLIP whose image tower is a CNN
(towers='all' says what it changes), and timm's spatial intermediates of merged tokens."""

from __future__ import annotations

import warnings

import pytest
import tiny_models as tm
import torch

import vleff


def _coca():
    import open_clip
    from open_clip.coca_model import MultimodalCfg
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=tm.PATCH, image_size=tm.IMG)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=2, embed_cls=True)
    multimodal = MultimodalCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=1)
    return open_clip.CoCa(embed_dim=32, multimodal_cfg=multimodal, text_cfg=text, vision_cfg=vision).eval()


@pytest.mark.parametrize("method, settings", [("tome", {"r": 1}), ("evit", {"keep_rate": 0.5})])
def test_coca_text_tower_is_refused_at_apply_and_its_image_tower_works(method, settings):
    model = _coca()
    keys = set(model.state_dict())
    with pytest.raises(TypeError, match="cannot apply .* open_clip text tower .*CoCa's embed_cls.*towers='image'"):
        getattr(vleff, f"apply_{method}")(model, towers="text", **settings)
    assert vleff.registry.applied_methods(model) == [] and set(model.state_dict()) == keys
    getattr(vleff, f"apply_{method}")(model, towers="image", **settings)
    with torch.no_grad():
        model.encode_image(tm.images(2))


def test_towers_all_on_a_cnn_clip_says_only_the_text_tower_changes():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, image_size=64)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=2)
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).eval()
    with pytest.warns(
        UserWarning,
        match="towers='all': CLIP also has open_clip image tower ModifiedResNet .*only open_clip text tower",
    ):
        vleff.apply_tome(model, r=1, towers="all")
    vleff.remove_tome(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # naming the tower: nothing to say
        vleff.apply_tome(model, r=1, towers="text")


def test_spatial_intermediates_of_merged_tokens_are_refused_and_token_ones_work():
    model = vleff.apply_tome(tm.timm_vit(depth=3).eval(), r=2)
    with pytest.raises(ValueError, match="output_fmt='NCHW'.*merged tokens have no patch grid.*output_fmt='NLC'"):
        model.forward_intermediates(tm.images(2))  # timm's default format is NCHW
    _, layers = model.forward_intermediates(tm.images(2), output_fmt="NLC")
    assert [t.shape[1] for t in layers] == [14, 12, 10]  # 16 patches, r=2 per block (prefix dropped)
    vleff.update(model, "tome", r=0)  # nothing merged: the grid is intact
    _, grids = model.forward_intermediates(tm.images(2))
    assert all(g.shape[-2:] == (4, 4) for g in grids)
    vleff.remove_tome(model)
    assert "forward_intermediates" not in model.__dict__  # the library's own again
