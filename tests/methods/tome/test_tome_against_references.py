"""ToMe pinned against independent references (issue 12: 1, 3).

* proportional attention in the model path: a sequence of identical patch tokens merged with
  ``+log size`` gives exactly the unmerged model's output; without it (or with ``+size``) the
  cls token's attention over the patches changes;
* the attention bias ToMe hands the block is ``log(size)``, checked against sizes counted by hand;
* the matching metric is the block's keys averaged over heads, recomputed here from the
  timm block's own ``qkv`` projection (keys and token features disagree about the best pairs).
"""

from __future__ import annotations

import copy
import math

import tiny_models as tm
import torch
from vleff.tokens.tome import ToMeConfig, ToMeHook

from vleff import apply_tome
from vleff.backbones import TowerHook, find_tower, last_token_state, patch_tower
from vleff.kernels.tome import bipartite_soft_matching_reference, merge_weighted_reference


class Capture(TowerHook):
    """Records the tokens a block's ``before``/``between`` sees (installed before or after ToMe)."""

    def __init__(self, name: str) -> None:
        self.name = name  # instance attribute: several captures on one tower
        self.before_x: dict[int, torch.Tensor] = {}
        self.between_x: dict[int, torch.Tensor] = {}
        self.bias: dict[int, torch.Tensor | None] = {}
        self.size: dict[int, torch.Tensor | None] = {}
        self.source: dict[int, torch.Tensor | None] = {}

    def before(self, x, info, state):
        self.before_x[info.index] = x.detach().clone()
        return x

    def between(self, x, info, state):
        self.between_x[info.index] = x.detach().clone()
        self.bias[info.index] = None if info.bias is None else info.bias.detach().clone()
        self.size[info.index] = None if state.size is None else state.size.detach().clone()
        src = state.get("source")
        self.source[info.index] = None if src is None else src.detach().clone()
        return x


def _identical_patch_model() -> torch.nn.Module:
    """A tiny timm ViT where a constant image gives 16 identical patch tokens (pos embed 0)."""
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    with torch.no_grad():
        model.pos_embed.zero_()
        model.cls_token.normal_(0, 1.0)  # the cls token differs from the patches
    return model


def _constant_images() -> torch.Tensor:
    return torch.full((2, 3, tm.IMG, tm.IMG), 0.7).double()


def test_constant_image_gives_identical_patch_tokens():
    model = _identical_patch_model().double()
    with torch.no_grad():
        tokens = model.patch_embed(_constant_images())
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))


def test_prop_attn_merging_identical_tokens_leaves_output_unchanged():
    model = _identical_patch_model().double()
    x = _constant_images()
    with torch.no_grad():
        ref = model(x)
        merged = apply_tome(copy.deepcopy(model), r=3, prop_attn=True)
        out = merged(x)
        assert last_token_state(merged).token_counts == [17, 14, 11]  # tokens really merged
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        plain = apply_tome(copy.deepcopy(model), r=3, prop_attn=False)(x)
    # without proportional attention the cls token sees 11 patch tokens instead of 16 in block 2
    # (float64: the prop-attn run agrees to 1e-10, this one differs by orders of magnitude more)
    assert (plain - ref).abs().max() > 1e-6, (plain - ref).abs().max()


def test_prop_attn_bias_is_log_size_not_size():
    """``+size`` (or no bias) instead of ``+log size`` breaks the invariance above."""
    model = _identical_patch_model().double()
    x = _constant_images()

    class SizeBias(ToMeHook):  # what a ``+size`` bug would do
        def attention_bias(self, state, dtype):
            size = state.size
            return None if size is None else size[..., 0].to(dtype)[:, None, None, :]

    with torch.no_grad():
        ref = model(x)
        wrong = copy.deepcopy(model)
        patch_tower(find_tower(wrong)).add_hook(SizeBias(ToMeConfig(r=3), depth=3))
        assert (wrong(x) - ref).abs().max() > 1e-6


def test_attention_bias_equals_log_of_hand_counted_sizes():
    torch.manual_seed(1)
    model = tm.timm_vit().eval()
    apply_tome(model, r=4, trace_source=True)
    cap = Capture("pinned_after_tome")
    patch_tower(find_tower(model)).add_hook(cap)
    with torch.no_grad():
        model(tm.images())
    assert cap.bias[0] is None  # nothing merged before block 0's attention: no bias at all
    for block in (1, 2):
        # sizes by hand: each token holds the input tokens its source row marks
        src = cap.source[block - 1]  # after block (block-1)'s merge = what block `block` attends over
        hand_size = src.sum(dim=-1)  # [B, N]
        assert torch.equal(hand_size, hand_size.round())
        assert float(hand_size.sum()) == 2 * 17
        expected = torch.tensor([[math.log(v) for v in row] for row in hand_size.tolist()])
        bias = cap.bias[block]
        assert bias.shape == (2, 1, 1, hand_size.shape[1])
        torch.testing.assert_close(bias[:, 0, 0].float(), expected, atol=1e-6, rtol=1e-6)
        assert (hand_size > 1).any()  # merged tokens carry a non-zero bias


def test_attention_bias_of_a_state_by_hand():
    from vleff.backbones.state import TokenState

    state = TokenState(num_prefix=1, num_input_tokens=4, num_tokens=4, batch_size=1)
    state.register("size", torch.tensor([[[1.0], [2.0], [3.0], [5.0]]]), "sum")
    hook = ToMeHook(ToMeConfig(r=1), depth=1)
    bias = hook.attention_bias(state, torch.float32)
    torch.testing.assert_close(bias, torch.tensor([[[[0.0, 0.6931472, 1.0986123, 1.6094379]]]]))
    off = ToMeHook(ToMeConfig(r=1, prop_attn=False), depth=1)
    assert off.attention_bias(state, torch.float32) is None


def _keys_disagree_model() -> torch.nn.Module:
    torch.manual_seed(3)
    return tm.timm_vit(depth=1).eval()


def test_matching_uses_head_averaged_keys_from_the_blocks_qkv():
    model = _keys_disagree_model()
    x = tm.images(seed=4)
    r = 3
    before = Capture("pinned_before_tome")
    patch_tower(find_tower(model)).add_hook(before)
    apply_tome(model, r=r)
    after = Capture("pinned_after_tome")
    patch_tower(find_tower(model)).add_hook(after)
    with torch.no_grad():
        model(x)
        block = model.blocks[0]
        x_in, x_attn = before.before_x[0], before.between_x[0]
        # the keys, straight from timm's modules: k = k_norm(qkv(norm1(x)))[k part], mean over heads
        b, n, c = x_in.shape
        h = block.attn.num_heads
        qkv = block.attn.qkv(block.norm1(x_in)).reshape(b, n, 3, h, c // h)
        keys = block.attn.k_norm(qkv[:, :, 1].transpose(1, 2))  # [B, H, N, Dh]
        metric = keys.mean(dim=1)
        plan = bipartite_soft_matching_reference(metric, r, 1)
        expected, _ = merge_weighted_reference(x_attn, torch.ones(b, n, 1), plan)
        # the test can tell keys from features apart: matching on the features picks other pairs
        feat_plan = bipartite_soft_matching_reference(x_attn, r, 1)
        assert not torch.equal(feat_plan.src_idx.sort(-1).values, plan.src_idx.sort(-1).values)
    torch.testing.assert_close(after.between_x[0], expected, atol=1e-6, rtol=1e-6)
