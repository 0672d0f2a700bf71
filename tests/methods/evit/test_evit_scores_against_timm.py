"""EViT's selection scores pinned against the library's own attention (issue 12: 2).

The reference is timm's ``Attention`` itself, run unpatched with ``fused_attn=False``: a forward
hook on its ``attn_drop`` receives the attention probabilities ``[B, H, N, N]``; their cls row
averaged over heads is what EViT must rank by. Checked: the row a real forward hands EViT
(``BlockInfo.row_attention(0)``) and the tokens EViT keeps.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch

from vleff import apply_evit
from vleff.backbones import TowerHook, find_tower, patch_tower


class RowCapture(TowerHook):
    """Installed before EViT: records the cls-attention row the block computed and the tokens."""

    name = "pinned_row_capture"

    def __init__(self) -> None:
        self.rows: dict[int, torch.Tensor] = {}
        self.between_x: dict[int, torch.Tensor] = {}

    def between(self, x, info, state):
        self.rows[info.index] = info.row_attention(0).detach().clone()
        self.between_x[info.index] = x.detach().clone()
        return x


class AfterCapture(TowerHook):
    """Installed after EViT: the tokens it left."""

    name = "pinned_after_capture"

    def __init__(self) -> None:
        self.between_x: dict[int, torch.Tensor] = {}

    def between(self, x, info, state):
        self.between_x[info.index] = x.detach().clone()
        return x


def _reference_probs(model: torch.nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Attention probabilities of every block of the plain (unpatched) timm model."""
    ref = copy.deepcopy(model)
    probs: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(ref.blocks):
        block.attn.fused_attn = False
        handles.append(
            block.attn.attn_drop.register_forward_hook(
                lambda mod, args, out, i=i: probs.__setitem__(i, args[0].detach().clone())
            )
        )
    with torch.no_grad():
        ref(x)
    for h in handles:
        h.remove()
    return probs


@pytest.mark.parametrize("location", [0, 1])
def test_evit_scores_are_the_cls_attention_row_and_it_keeps_their_top_k(location):
    torch.manual_seed(5)
    model = tm.timm_vit().eval()
    x = tm.images(seed=6)
    probs = _reference_probs(model, x)  # before any method: the library's own forward

    before, after = RowCapture(), AfterCapture()
    patch_tower(find_tower(model)).add_hook(before)
    apply_evit(model, keep_rate=0.5, locations=[location], fuse=False)
    patch_tower(find_tower(model)).add_hook(after)
    with torch.no_grad():
        model(x)

    cls_row = probs[location][:, :, 0, :].mean(dim=1)  # [B, N]: cls query, averaged over heads
    other = probs[location][:, :, 1, :].mean(dim=1)
    assert (cls_row - other).abs().max() > 1e-3  # another query row would not pass
    torch.testing.assert_close(before.rows[location], cls_row, atol=1e-6, rtol=1e-5)

    # the kept tokens: cls, then the 8 patches the cls token attends to most, in their order
    k = 8
    top = cls_row[:, 1:].topk(k, dim=1).indices.sort(dim=1).values + 1
    idx = torch.cat([torch.zeros(2, 1, dtype=torch.long), top], dim=1)
    x_in = before.between_x[location]
    expected = x_in.gather(1, idx[..., None].expand(-1, -1, x_in.shape[-1]))
    assert after.between_x[location].shape == expected.shape
    torch.testing.assert_close(after.between_x[location], expected, atol=0, rtol=0)


def test_evit_fused_token_is_the_cls_attention_weighted_mean_of_the_dropped():
    torch.manual_seed(7)
    model = tm.timm_vit().eval()
    x = tm.images(seed=8)
    probs = _reference_probs(model, x)
    before, after = RowCapture(), AfterCapture()
    patch_tower(find_tower(model)).add_hook(before)
    apply_evit(model, keep_rate=0.5, locations=[1], fuse=True)
    patch_tower(find_tower(model)).add_hook(after)
    with torch.no_grad():
        model(x)
    score = probs[1][:, :, 0, 1:].mean(dim=1)  # [B, 16]
    top = score.topk(8, dim=1).indices
    dropped = torch.ones_like(score, dtype=torch.bool).scatter(1, top, False)
    w = score * dropped
    w = w / w.sum(dim=1, keepdim=True)
    fused = (w[..., None] * before.between_x[1][:, 1:]).sum(dim=1)
    out = after.between_x[1]
    assert out.shape[1] == 1 + 8 + 1
    torch.testing.assert_close(out[:, -1], fused, atol=1e-6, rtol=1e-5)
