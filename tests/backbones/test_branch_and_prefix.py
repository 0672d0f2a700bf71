"""The adapter and prompt seams of the generic block: ``TowerHook.branch`` (a sublayer's output
rewritten before the residual add) and ``TowerHook.attention_prefix`` (keys and values in front of
the attention's own).

Each is checked against an independent computation: the library's own forward with plain torch
hooks doing the same rewrite (timm and BLIP's post-norm text layers), VPT-deep done the way its
reference does it (prompt tokens inserted after the class token and overwritten before every
block), and a naive masked softmax over the concatenated keys.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.backbones import TowerHook, find_tower, find_towers, patch_tower, unpatch_tower
from vleff.backbones.base import AttentionConfig
from vleff.backbones.blip_text import HFBlipTextAdapter
from vleff.backbones.block import _attention_with_prefix, keep_masked_softmax


class Branches(TowerHook):
    """A serial adapter on the attention output and a parallel one beside the MLP (reads ``x``)."""

    name = "branches"

    def __init__(self, serial: list[torch.Tensor], parallel: list[torch.Tensor], scale: float) -> None:
        self.serial, self.parallel, self.scale = serial, parallel, scale

    def branch(self, name, x, out, info, state):
        if name == "attention":
            return out + torch.tanh(out @ self.serial[info.index])
        return out + self.scale * (x @ self.parallel[info.index])


def _weights(depth: int, dim: int, dtype=torch.float64) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    make = lambda: [torch.randn(dim, dim, generator=g, dtype=dtype) * 0.1 for _ in range(depth)]
    return make(), make()


def test_branch_hook_equals_the_library_with_torch_hooks_on_timm():
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    serial, parallel = _weights(3, 64)
    images = tm.images().double()

    handles, stream = [], {}
    for i, blk in enumerate(model.blocks):  # the same rewrite on the library's own modules
        handles.append(blk.attn.register_forward_hook(lambda m, a, o, i=i: o + torch.tanh(o @ serial[i])))
        handles.append(blk.norm2.register_forward_pre_hook(lambda m, a, i=i: stream.__setitem__(i, a[0])))
        handles.append(blk.mlp.register_forward_hook(lambda m, a, o, i=i: o + 0.5 * (stream[i] @ parallel[i])))
    with torch.no_grad():
        ref = model(images)
    for h in handles:
        h.remove()
    with torch.no_grad():
        plain = model(images)
    assert (ref - plain).abs().max() > 1e-3  # the rewrite changes the output

    tower = find_tower(model)
    patch_tower(tower).add_hook(Branches(serial, parallel, 0.5))
    with torch.no_grad():
        out = model(images)
    unpatch_tower(tower.root)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_branch_hook_on_blip_post_norm_text_layers():
    """Post-norm: the attention's and the FFN's output (after dropout) before ``LayerNorm(x + out)``."""
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().double().eval()
    ids, mask = tm.blip_token_ids()
    towers = [t for t in find_towers(model, "text") if isinstance(t, HFBlipTextAdapter)]
    (tower,) = towers
    layers = tower.blocks()
    width = layers[0].output.dense.out_features
    serial, parallel = _weights(len(layers), width)
    fwd = lambda: model(input_ids=ids, pixel_values=tm.images().double(), attention_mask=mask).question_embeds

    handles, stream = [], {}
    for i, layer in enumerate(layers):
        handles.append(
            layer.attention.output.dense.register_forward_hook(lambda m, a, o, i=i: o + torch.tanh(o @ serial[i]))
        )
        handles.append(layer.intermediate.register_forward_pre_hook(lambda m, a, i=i: stream.__setitem__(i, a[0])))
        parallel_add = lambda m, a, o, i=i: o + 0.5 * (stream[i] @ parallel[i])
        handles.append(layer.output.dense.register_forward_hook(parallel_add))
    with torch.no_grad():
        ref = fwd()
    for h in handles:
        h.remove()

    patch_tower(tower).add_hook(Branches(serial, parallel, 0.5))
    with torch.no_grad():
        out = fwd()
    unpatch_tower(tower.root)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


class DeepPrompts(TowerHook):
    """VPT-deep as an attention prefix: block i's prompts' keys and values from the block's own norm
    and projections (their outputs are discarded in VPT, so only their keys and values matter)."""

    name = "deep_prompts"

    def __init__(self, prompts: torch.Tensor) -> None:
        self.prompts = prompts  # [depth, P, C]

    def attention_prefix(self, info, state, h):
        p = info.adapter.parts(info.block).norm1(self.prompts[info.index][None])
        _, k, v = info.adapter.qkv(info.block, p)
        return k, v


def _vpt_reference(model, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """VPT-deep's reference forward: prompts inserted after the class token before block 1, the
    prompt slots overwritten by each block's own prompts, dropped before the final norm."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    n = prompts.shape[1]
    for i, blk in enumerate(model.blocks):
        rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
        x = blk(torch.cat([x[:, :1], prompts[i][None].expand(x.shape[0], -1, -1), rest], dim=1))
    x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
    return model.forward_head(model.norm(x))


def test_attention_prefix_is_vpt_deep_on_timm():
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    prompts = torch.randn(3, 5, 64, dtype=torch.float64)
    images = tm.images().double()
    with torch.no_grad():
        ref = _vpt_reference(model, images, prompts)
        plain = model(images)
    assert (ref - plain).abs().max() > 1e-3

    tower = find_tower(model)
    patch_tower(tower).add_hook(DeepPrompts(prompts))
    with torch.no_grad():
        out = model(images)
    unpatch_tower(tower.root)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


class KVPrefix(TowerHook):
    name = "kv_prefix"

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def attention_prefix(self, info, state, h):
        return self.keys[info.index], self.values[info.index]


def test_attention_prefix_keeps_a_causal_text_tower_causal():
    """open_clip's causal text tower: every position sees the prefix, no position sees a later token."""
    torch.manual_seed(0)
    model = tm.open_clip_model().double().eval()
    tower = find_tower(model, "text")
    keys = torch.randn(2, 1, 4, 3, 16, dtype=torch.float64)
    values = torch.randn(2, 1, 4, 3, 16, dtype=torch.float64)
    ids = tm.token_ids()
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 7) % 100
    seen: dict[str, torch.Tensor] = {}
    model.ln_final.register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0]))  # the blocks' output

    def run(t):
        with torch.no_grad():
            model.encode_text(t)
        return seen["out"]

    plain = run(ids)
    patch_tower(tower).add_hook(KVPrefix(keys, values))
    a, b = run(ids), run(changed)
    unpatch_tower(tower.root)
    assert (a - plain).abs().max() > 1e-3  # the prefix acts ...
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-10, rtol=0)  # ... and later tokens stay unseen
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-3


def _naive(q, k, v, pk, pv, scale, bias, causal, keep):
    """Softmax over [prefix keys, keys] written out: prefix columns always allowed."""
    b, h, n, _ = q.shape
    p = pk.shape[-2]
    keys = torch.cat([pk.expand(b, -1, -1, -1), k], -2)
    values = torch.cat([pv.expand(b, -1, -1, -1), v], -2)
    logits = (q * scale) @ keys.transpose(-2, -1)
    token_bias = torch.zeros(b, 1, n, n, dtype=q.dtype)
    if bias is not None:
        token_bias = token_bias + bias
    if causal:
        token_bias = token_bias.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    logits = logits + torch.cat([torch.zeros(b, 1, n, p, dtype=q.dtype), token_bias], -1)
    if keep is None:
        return logits.softmax(-1) @ values
    return keep_masked_softmax(logits, torch.cat([torch.ones(b, p, dtype=q.dtype), keep], -1)) @ values


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 7),
    p=st.integers(1, 4),
    causal=st.booleans(),
    padded=st.booleans(),
    fused=st.booleans(),
    kept=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_prefix_attention_against_a_naive_softmax(n, p, causal, padded, fused, kept, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 2, 4
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(1, h, p, d, generator=g, dtype=torch.float64) for _ in range(2))
    bias = None
    if padded:  # the last key of sample 0 is padding
        bias = torch.zeros(b, 1, 1, n, dtype=torch.float64)
        if n > 1:
            bias[0, ..., -1] = float("-inf")
    keep = None
    if kept:
        keep = (torch.rand(b, n, generator=g) > 0.4).double()
    cfg = AttentionConfig(num_heads=h, scale=d**-0.5, dropout_p=0.0, fused=fused)
    out, _ = _attention_with_prefix(q, k, v, (pk, pv), cfg, False, bias, causal, keep, False)
    ref = _naive(q, k, v, pk, pv, d**-0.5, bias, causal, keep)
    tol = 1e-6 if kept else 1e-9  # the keep-masked softmax runs in float32 (as the block does)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("need_probs", [True])
def test_prefix_probabilities_cover_the_tokens_only(need_probs):
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=torch.float64) for _ in range(3))
    pk, pv = (torch.randn(1, 2, 2, 4, dtype=torch.float64) for _ in range(2))
    cfg = AttentionConfig(num_heads=2, scale=0.5, dropout_p=0.0, fused=False)
    _, probs = _attention_with_prefix(q, k, v, (pk, pv), cfg, False, None, False, None, need_probs)
    assert probs is not None and probs.shape == (1, 2, 3, 3)
    assert (probs.sum(-1) < 1).all()  # the prefix took some of the mass
