"""The generic block forward must reproduce every library's own output and gradients."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from torch import nn

from vleff.backbones import find_tower, find_towers, last_token_state, patch_tower, unpatch_tower
from vleff.backbones.patch import PatchedForward


def _timm(**kw):
    return tm.timm_vit(**kw)


def _unfused(model):
    """The timm model with every block on its explicit softmax path (``fused_attn=False``)."""
    for block in model.blocks:
        block.attn.fused_attn = False
    return model


def _timm_unfused(**kw):
    return _unfused(tm.timm_vit(**kw))


FAMILIES = {
    "timm_vit": lambda: _timm(),
    "timm_vit_unfused": lambda: _timm_unfused(),
    "timm_layerscale_qknorm_registers": lambda: _timm(init_values=0.1, qk_norm=True, reg_tokens=2),
    "timm_layerscale_qknorm_registers_unfused": lambda: _timm_unfused(init_values=0.1, qk_norm=True, reg_tokens=2),
    "timm_registers_unfused": lambda: _timm_unfused(reg_tokens=3),
    "timm_qknorm_unfused": lambda: _timm_unfused(qk_norm=True),
    "timm_layerscale_unfused": lambda: _timm_unfused(init_values=0.1),
    "timm_dropout_droppath": lambda: _timm_unfused(attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2),
    "timm_dropout_fused": lambda: _timm(attn_drop_rate=0.2, drop_path_rate=0.2),
    "deit_distilled": lambda: tm.timm_deit_distilled(),
    "deit_distilled_unfused": lambda: _unfused(tm.timm_deit_distilled()),
    "open_clip": lambda: tm.open_clip_model(),
    "hf_clip_sdpa": lambda: tm.hf_clip_model("sdpa"),
    "hf_clip_eager": lambda: tm.hf_clip_model("eager"),
    "hf_blip": lambda: tm.hf_blip_retrieval(),
}
UNFUSED = {
    "timm_vit_unfused",
    "timm_layerscale_qknorm_registers_unfused",
    "timm_registers_unfused",
    "timm_qknorm_unfused",
    "timm_layerscale_unfused",
    "timm_dropout_droppath",
    "deit_distilled_unfused",
}
assert UNFUSED <= set(FAMILIES)


def outputs(model: nn.Module, x: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every tower's output of a model, as tensors."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return [model.forward_features(x), model(x)]
    name = type(model).__name__
    if name == "CLIP":
        return [model.encode_image(x), model.encode_text(ids)]
    if name == "CLIPModel":
        out = model(input_ids=ids, pixel_values=x, attention_mask=(ids != 0).long())
        return [out.image_embeds, out.text_embeds, out.vision_model_output.last_hidden_state]
    if name == "BlipForImageTextRetrieval":  # vision tower, then the text encoder's ITM (cross) and ITC paths
        out = model.vision_model(pixel_values=x)
        mask = (ids != 0).long()
        itm = model(input_ids=ids, pixel_values=x, attention_mask=mask).itm_score
        itc = model(input_ids=ids, pixel_values=x, attention_mask=mask, use_itm_head=False).itm_score
        return [out.last_hidden_state, out.pooler_output, itm, itc]
    raise AssertionError(name)


def run(model, x, ids, seed=0):
    torch.manual_seed(seed)
    return outputs(model, x, ids)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_generic_block_reproduces_library(family, train):
    torch.manual_seed(0)
    model = FAMILIES[family]().train(train)
    x, ids = tm.images(), tm.token_ids()
    x.requires_grad_(True)

    ref = run(model, x, ids)
    ref_grads = torch.autograd.grad(
        sum(o.float().square().mean() for o in ref), [x, *model.parameters()], allow_unused=True
    )

    towers = find_towers(model)
    if family.startswith(("timm", "deit")):  # the attention path under test is the one the library ran
        fused = [block.attn.fused_attn for block in model.blocks]
        assert fused == [family not in UNFUSED] * len(fused)
        assert {tower.attention_config(b).fused for tower in towers for b in tower.blocks()} == {family not in UNFUSED}
    for tower in towers:
        patch_tower(tower)
        assert all(isinstance(b.__dict__["forward"], PatchedForward) for b in tower.blocks())
    out = run(model, x, ids)
    grads = torch.autograd.grad(
        sum(o.float().square().mean() for o in out), [x, *model.parameters()], allow_unused=True
    )

    for tower in towers:  # the generic path really ran, once per block
        state = last_token_state(model, tower.modality)
        assert state is not None and len(state.token_counts) == len(tower.blocks())
    for a, b in zip(ref, out):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for ga, gb in zip(ref_grads, grads):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)

    for tower in towers:
        assert unpatch_tower(tower.root)
        assert all("forward" not in b.__dict__ for b in tower.blocks())
    for a, b in zip(ref, run(model, x, ids)):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_towers_found_per_family():
    assert [t.modality for t in find_towers(tm.open_clip_model())] == ["text", "image"]
    assert sorted(t.modality for t in find_towers(tm.hf_clip_model())) == ["image", "text"]
    assert [(t.family, t.modality) for t in find_towers(tm.hf_blip_retrieval())] == [
        ("transformers", "image"),
        ("transformers", "text"),
    ]
    deit = find_tower(tm.timm_deit_distilled())
    assert deit.num_prefix_tokens == 2 and deit.has_cls_token
    reg = find_tower(tm.timm_vit(reg_tokens=3))
    assert reg.num_prefix_tokens == 4
    text = find_tower(tm.open_clip_model(), "text")
    assert text.pooling == "eot" and text.num_prefix_tokens == 0


def test_tower_inside_a_wrapper_module_is_found():
    wrapper = nn.Sequential(nn.Identity(), tm.timm_vit())
    assert find_tower(wrapper).root is wrapper[1]


def test_unsupported_model_names_class_and_lists_supported():
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.container\.Sequential.*timm VisionTransformer"):
        find_towers(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        find_towers("not a model")
    with pytest.raises(TypeError, match="no supported text tower"):
        find_towers(tm.timm_vit(), "text")


def test_unsupported_timm_block_is_refused():
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(TypeError, match="ResPostBlock"):
        find_towers(tm.timm_vit(block_fn=ResPostBlock))


def test_patched_model_deepcopies_independently():
    model = tm.timm_vit().eval()
    patch_tower(find_tower(model))
    clone = copy.deepcopy(model)
    x = tm.images()
    clone(x)
    assert last_token_state(clone) is not None
    assert last_token_state(model) is None  # the copy's forward did not touch the original
    torch.testing.assert_close(clone(x), model(x))


def test_batch_first_false_open_clip_tower():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=2),
    ).eval()
    model.visual.transformer = open_clip.transformer.Transformer(width=32, layers=2, heads=2, batch_first=False)
    model.eval()
    x = tm.images()
    ref = model.encode_image(x)
    tower = find_tower(model)
    patch_tower(tower)
    assert tower.sequence_first
    torch.testing.assert_close(model.encode_image(x), ref, atol=1e-5, rtol=1e-5)
