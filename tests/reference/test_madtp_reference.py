"""MADTP against the official code's behaviour (double125/MADTP at fa3cc4e, ``clip/model.py``
``ResidualAttentionBlock.Reduce_token`` / ``forward``), written out here in plain PyTorch on the
same float64 weights:

* the codebook score is the raw maximum over codes divided by its sum over the patches
  (``+ 1e-8``), like the attention score; no shift (issue 23, point 6);
* a block keeps the batch maximum count of patches above the threshold and fuses the rest into
  one token, and is skipped when at most ``max_keep = 1`` patch clears the threshold or at most
  one would be fused (point 9);
* the ragged ``"mask"`` rectangle is exactly what the neediest sample needs: never more tokens
  out of a block than into it (point 7);
* the text tower's EOT is never fused (point 8).
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from vleff.tokens.madtp import apply_madtp

from vleff.backbones import token_counts


def _clip(layers: int = 4):
    """A float64 open_clip CLIP with 64 patches per image (4 vision blocks, widths 64 / 32)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=layers, width=64, head_width=16, patch_size=8, image_size=64)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=3)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text).double().eval()


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 64, 64, generator=g, dtype=torch.float64)


def _official_image_tower(model, images: torch.Tensor, tau: float, max_keep: int = 1, shift: bool = False):
    """The official CLIP vision forward with MADTP pruning: ``(image embedding, tokens entering
    each block, per block the batch maximum of patches above the threshold)``. Written from the
    reference's behaviour, not from vleff."""
    visual = model.visual
    module = model.vleff_madtp
    b = images.shape[0]
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(b, 1, -1), x], dim=1) + visual.positional_embedding
    x = visual.ln_pre(x)
    counts, tops = [], []
    for i, blk in enumerate(visual.transformer.resblocks):
        counts.append(x.shape[1])
        # codebook scores of the block input's patches: raw dot products [B, P, codes]
        scores = module.proj["image"][i](x[:, 1:]) @ module.codebook.t()
        # attention, probabilities and per-head outputs kept
        mha = blk.attn
        n, width = x.shape[1], x.shape[2]
        qkv = F.linear(blk.ln_1(x), mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, mha.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # [B, H, N, N]
        heads = probs @ v  # [B, H, N, Dh]
        x = x + mha.out_proj(heads.transpose(1, 2).reshape(b, n, width))
        # the three scores over the patches
        received = probs[:, :, 1:, 1:].max(dim=1).values.sum(dim=1)
        received = received / (received.sum(dim=1, keepdim=True) + 1e-8)
        code = scores.max(dim=2).values
        if shift:  # not the reference: vleff's code_norm="shift"
            code = code - code.min(dim=1, keepdim=True).values
        code = code / (code.sum(dim=1, keepdim=True) + 1e-8)
        head_norm = heads[:, :, 1:].norm(dim=-1)
        head_norm = head_norm / (head_norm.sum(dim=1, keepdim=True) + 1e-8)
        cls = (probs[:, :, 0, 1:] * head_norm).sum(dim=1)
        importance = (received + code + cls) / 3.0  # [B, P]
        weights = torch.softmax(scores / tau, dim=1)  # over the patches, per code
        threshold = torch.einsum("bpc,bp->bc", weights, importance).min(dim=1).values
        top = int((importance > threshold[:, None]).sum(dim=1).max())
        tops.append(top)
        patches = x[:, 1:]
        if not (top <= max_keep or patches.shape[1] - top <= 1):
            order = importance.argsort(dim=1, descending=True)
            rows = torch.arange(b)[:, None]
            kept = patches[rows, order[:, :top]]
            rest = order[:, top:]
            w = importance[rows, rest]
            w = w / (w.sum(dim=1, keepdim=True) + 1e-8)
            fused = (w[..., None] * patches[rows, rest]).sum(dim=1, keepdim=True)
            x = torch.cat([x[:, :1], kept, fused], dim=1)
        x = x + blk.mlp(blk.ln_2(x))
    return visual.ln_post(x[:, 0]) @ visual.proj, counts, tops


# --- points 6 and 9: the image tower equals the official code ----------------------------------------
@pytest.mark.parametrize("tau", [0.3, 3.0, 30.0])
def test_image_tower_equals_the_official_code_block_by_block(tau):
    """ragged="max" (the reference's batch maximum): the same token count entering every block
    and the same embedding to float64 noise, at several τ."""
    model = _clip()
    apply_madtp(model, tau=tau, ragged="max", towers="image")
    images = _images(3)
    with torch.no_grad():
        ours = model.encode_image(images)
        counts = token_counts(model)["image"]
        ref, ref_counts, _ = _official_image_tower(model, images, tau)
    assert counts == ref_counts
    assert ref_counts[-1] < ref_counts[0]  # it pruned
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)


def _dominated(model) -> None:
    """Every codebook row the same vector: each code's softmax (at a low τ) sits on one patch, so
    the threshold is that patch's importance and at most a few patches clear it."""
    with torch.no_grad():
        model.vleff_madtp.codebook.copy_(model.vleff_madtp.codebook[:1].expand_as(model.vleff_madtp.codebook))


def _edge_cases(model, tau: float, max_keep: int) -> list[int]:
    """Images one at a time (so "mask" and the batch maximum agree with the reference): vleff's
    token counts and embedding equal the reference's; returns block 0's count above threshold."""
    tops = []
    for seed in range(4):
        images = _images(1, seed=seed)
        with torch.no_grad():
            ours = model.encode_image(images)
            counts = token_counts(model)["image"]
            ref, ref_counts, ref_tops = _official_image_tower(model, images, tau, max_keep=max_keep)
        assert counts == ref_counts, (seed, ref_tops)
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9)
        tops.append(ref_tops[0])
    return tops


@pytest.mark.parametrize("ragged", ["max", "mask"])
@pytest.mark.parametrize(("tau", "top"), [(1e-3, 0), (0.1, 1)])
def test_a_block_where_at_most_one_patch_clears_the_threshold_is_skipped(ragged, tau, top):
    """The official CLIP code returns the tokens unchanged when ``topk_num <= max_keep`` (1 for
    images): vleff's default ``min_keep=1`` keeps every token at such a block (it used to prune
    to ``min_keep`` patches plus the fused one). A codebook of one repeated row makes every
    code's softmax (at a low τ) sit on one patch, the threshold that patch's importance, so
    block 0 sees no patch (τ=1e-3) or exactly one (τ=0.1) above it."""
    model = _clip(layers=2)
    apply_madtp(model, tau=tau, ragged=ragged, towers="image")
    _dominated(model)
    assert top in _edge_cases(model, tau, max_keep=1)  # the edge case occurred


def test_min_keep_0_is_the_blip_codes_rule():
    """``min_keep=0``: a block prunes to one patch when only one clears the threshold, as the
    official BLIP code (``models/vit.py``, ``models/med.py``: skipped only when ``topk_num < 1``)."""
    model = _clip(layers=2)
    apply_madtp(model, tau=0.1, ragged="max", towers="image", min_keep=0)
    _dominated(model)
    seed = _edge_cases(model, 0.1, max_keep=0).index(1)  # a ValueError if the case did not occur
    with torch.no_grad():
        model.encode_image(_images(1, seed=seed))
    assert token_counts(model)["image"] == [65, 3]  # cls, the one patch, the fused token


# --- point 7: the "mask" rectangle is what the neediest sample needs ------------------------------------
@pytest.mark.parametrize(("tower", "tau"), [("image", 0.1), ("image", 0.3), ("text", 1.0)])
def test_mask_rectangle_is_the_neediest_samples_count_and_never_grows(tower, tau):
    """Under ``ragged="mask"`` each sample's tokens are its own, so a batch needs at each block
    the largest count any of its samples has alone; a sample that fuses nothing while another
    does used to add a slot (65 -> 66 image tokens, 8 -> 9 text tokens here)."""
    model = _clip(layers=3)
    apply_madtp(model, tau=tau, ragged="mask", towers=tower)
    if tower == "image":
        inputs, encode = _images(4, seed=1), model.encode_image
    else:
        inputs, encode = tm.token_ids(4, length=16, seed=1), model.encode_text
    with torch.no_grad():
        both = encode(inputs)
        counts = token_counts(model)[tower]
        alone, alone_counts = [], []
        for i in range(inputs.shape[0]):
            alone.append(encode(inputs[i : i + 1]))
            alone_counts.append(token_counts(model)[tower])
    assert counts == [max(c) for c in zip(*alone_counts)], alone_counts
    assert counts == sorted(counts, reverse=True)  # never more tokens out than in
    assert len(set(map(tuple, alone_counts))) > 1  # the samples needed different counts
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-10, rtol=1e-9)  # each sample is its own


# --- point 8: the text tower's pooled token is never pruned ------------------------------------------
@pytest.mark.parametrize("family", ["open_clip", "hf_clip"])
@pytest.mark.parametrize("ragged", ["mask", "max"])
def test_the_eot_token_is_never_fused_or_dropped(family, ragged):
    """Heavy pruning (τ=1e3, every block) of CLIP text: after the last block each caption's EOT
    is still a token of its own, holding its input position and no other (the reference CLIP
    code pools at the original EOT index of a reordered sequence; vleff keeps the EOT out of
    the candidates, as its docstring promises). Making the EOT a candidate fails this test."""
    from vleff.backbones import find_pair, get_patch
    from vleff.backbones.text import PROTECTED, SOURCE

    torch.manual_seed(0)
    model = (_clip(layers=3) if family == "open_clip" else tm.hf_clip_model().double()).eval()
    apply_madtp(model, tau=1e3, ragged=ragged, towers="text")
    pair = find_pair(model)
    ids = tm.token_ids(4, length=16, seed=2)
    eot = ids.argmax(dim=-1)  # the EOT (id 99) is the largest id, once per caption
    with torch.no_grad():
        pair.encode_text(ids)
    counts = token_counts(model)["text"]
    state = get_patch(pair.text_tower.root).state
    source, protected = state.get(SOURCE), state.get(PROTECTED).bool()
    assert counts[-1] < counts[0] // 2, counts  # most tokens were fused away (or padding dropped)
    assert protected.sum(dim=1).tolist() == [1] * 4
    held = source[protected]  # [B, input positions]: what each EOT token holds
    torch.testing.assert_close(held, F.one_hot(eot, source.shape[-1]).to(held.dtype), atol=0, rtol=0)


# --- options and bad input ---------------------------------------------------------------------------
def test_code_norm_shift_is_the_old_minimum_shift():
    """``code_norm="shift"`` (kept as an option): the codebook score minus its minimum over the
    patches, then over its sum; it prunes differently from the reference at the same τ."""
    model = _clip(layers=3)
    apply_madtp(model, tau=3.0, ragged="max", towers="image", code_norm="shift")
    images = _images(3)
    with torch.no_grad():
        shifted = model.encode_image(images)
        counts = token_counts(model)["image"]
        ref, ref_counts, _ = _official_image_tower(model, images, 3.0, shift=True)
        official, official_counts, _ = _official_image_tower(model, images, 3.0)
    assert counts == ref_counts != official_counts
    torch.testing.assert_close(shifted, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize(
    ("name", "value", "allowed"), [("code_norm", "max", "'sum', 'shift'"), ("min_keep", -1, ">= 0")]
)
def test_bad_settings_are_refused_with_what_is_allowed(name, value, allowed):
    from vleff.tokens.madtp import MADTPConfig

    with pytest.raises(ValueError, match=f"{name}={value!r}") as err:
        MADTPConfig(**{name: value})
    assert allowed in str(err.value)
