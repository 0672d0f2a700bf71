"""Turbo against its definition (official code: BLIP_turbo/turbo/merge.py, worked out here):
ToMe's matching with each source's best similarity lowered by β^|γ−l|·α·30·(class token's
attention), the merge ToMe's; alpha=0 is ToMe exactly; r_threshold stops merging; FLOPs are ToMe's
plus the one attention row Turbo reads."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import vleff
from vleff.backbones import last_token_state
from vleff.flops import count_flops
from vleff.methods.turbo.core import SEMANTIC_SCALE


def _expected_groups(model, images, r: int, alpha: float) -> set[frozenset[int]]:
    """The merge groups of the first block, by hand from the unpatched block's q and k."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    block = model.blocks[0]
    attn = block.attn
    b, n, _ = x.shape
    q, k, _ = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    cls_attn = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0]  # [B, N]
    metric = k.mean(1)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, bb = metric[:, ::2], metric[:, 1::2]
    scores = a @ bb.transpose(-1, -2)
    scores[:, 0, :] = -torch.inf  # the class token never merges
    node_max, node_idx = scores.max(-1)
    info = node_max - alpha * SEMANTIC_SCALE * cls_attn[:, ::2]
    groups = []
    for s in range(b):
        chosen = info[s].argsort(descending=True, stable=True)[:r]
        dest: dict[int, set[int]] = {}
        for i in chosen.tolist():
            d = 2 * int(node_idx[s, i]) + 1
            dest.setdefault(d, {d}).add(2 * i)
        groups.append({frozenset(g) for g in dest.values()})
    return groups


def _merged_groups(state) -> list[set[frozenset[int]]]:
    source = state.get("source")  # [B, N_out, N_in]
    return [
        {frozenset(torch.nonzero(row).flatten().tolist()) for row in sample if int((row > 0).sum()) > 1}
        for sample in source
    ]


@pytest.mark.parametrize("alpha", [0.0, 5.0, 50.0])
def test_first_block_merges_the_reference_groups(alpha):
    torch.manual_seed(0)
    model = tm.timm_vit(depth=1).double().eval()
    images = tm.images(3).double()
    with torch.no_grad():
        expected = _expected_groups(model, images, 3, alpha)
        vleff.apply_turbo(model, r=3, alpha=alpha, r_threshold=0, trace_source=True)
        model(images)
    assert _merged_groups(last_token_state(model)) == expected


def test_alpha_changes_which_tokens_merge():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=1).double().eval()
    images = tm.images(3).double()
    with torch.no_grad():
        assert _expected_groups(model, images, 3, 0.0) != _expected_groups(model, images, 3, 50.0)


@pytest.mark.parametrize("family", ["timm", "open_clip"])
def test_alpha_zero_is_tome_exactly(family):
    make = {"timm": lambda: tm.timm_vit(), "open_clip": tm.open_clip_model}[family]
    fwd = {"timm": lambda m, x: m(x), "open_clip": lambda m, x: m.encode_image(x)}[family]
    torch.manual_seed(0)
    turbo, tome = make().eval(), None
    tome = make().eval()
    tome.load_state_dict(turbo.state_dict())
    vleff.apply_turbo(turbo, r=3, alpha=0.0, r_threshold=0)
    vleff.apply_tome(tome, r=3)
    with torch.no_grad():
        torch.testing.assert_close(fwd(turbo, tm.images()), fwd(tome, tm.images()), rtol=0, atol=0)


def test_r_threshold_stops_merging_below_it():
    model = tm.timm_vit(depth=3).eval()
    with torch.no_grad():
        vleff.apply_turbo(model, r=2)  # the official 40: the tiny tower's 17 tokens never merge
        model(tm.images())
        assert last_token_state(model).token_counts == [17, 17, 17]
        vleff.update(model, "turbo", r_threshold=15)  # 17 and 15 merge, 13 does not
        model(tm.images())
        assert last_token_state(model).token_counts == [17, 15, 13]


def test_flops_are_tomes_plus_the_attention_row_turbo_reads():
    """The extra work is one attention row per merging block: q_cls · Kᵀ, 2·B·H·N·Dh FLOPs."""
    torch.manual_seed(0)
    turbo, tome = tm.timm_vit(depth=3).eval(), tm.timm_vit(depth=3).eval()
    tome.load_state_dict(turbo.state_dict())
    vleff.apply_turbo(turbo, r=2, r_threshold=0)
    vleff.apply_tome(tome, r=2)
    images = tm.images(2)
    extra = sum(2 * 2 * 4 * n * 16 for n in (17, 15, 13))  # B=2, 4 heads of 16, tokens entering each block
    assert count_flops(turbo, images) == count_flops(tome, images) + extra


def test_an_image_tower_without_class_token_is_refused():
    model = tm.timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(TypeError, match="Turbo on timm image tower .*no class token; use ToMe"):
        vleff.apply_turbo(model)
    assert not vleff.registry.applied_methods(model)


def test_bad_settings_name_the_setting():
    for bad, match in (({"alpha": -1.0}, "alpha"), ({"beta": 0}, "beta"), ({"r_threshold": 1.5}, "r_threshold")):
        with pytest.raises(ValueError, match=match):
            vleff.apply_turbo(tm.timm_vit(), **bad)
