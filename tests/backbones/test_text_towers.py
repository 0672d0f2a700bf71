"""Token reduction on text towers (open_clip and Hugging Face CLIP): EOT, padding, causal order.

The guarantees of :mod:`vleff.backbones.text`: a sentence's embedding does not depend on what
follows its EOT or on its padded length; the EOT is never merged or dropped; padding never
merges with real tokens; the causal mask rebuilt at the new length equals running the
library's own block on the kept tokens with the causal mask of their positions.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

import vleff
from vleff.backbones import last_token_state
from vleff.backbones.text import PAD, PROTECTED, SOURCE

ENCODERS = {
    "open_clip": (tm.open_clip_model, lambda m, ids: m.encode_text(ids)),
    "hf_clip": (tm.hf_clip_model, lambda m, ids: m.get_text_features(input_ids=ids).pooler_output),
}
METHODS = {"tome": {"r": 3}, "evit": {"keep_rate": 0.5, "locations": [0]}}


def _other_padding(ids: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The same sentences with random ids after each EOT (what follows the EOT must not matter)."""
    g = torch.Generator().manual_seed(seed)
    out = ids.clone()
    for b in range(ids.shape[0]):
        eot = int(ids[b].argmax())
        out[b, eot + 1 :] = torch.randint(1, 90, (ids.shape[1] - eot - 1,), generator=g)
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(ENCODERS))
def test_embedding_ignores_what_follows_the_eot(family, method):
    make, encode = ENCODERS[family]
    model = make().eval()
    ids = tm.token_ids(3)
    vleff.get_method(method).apply(model, towers="text", **METHODS[method])
    with torch.no_grad():
        out = encode(model, ids)
        assert last_token_state(model, "text").token_counts[-1] < ids.shape[1] or method == "evit"
        torch.testing.assert_close(encode(model, _other_padding(ids)), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", list(METHODS))
def test_embedding_does_not_depend_on_the_padded_length(method):
    make, encode = ENCODERS["hf_clip"]  # HF CLIP accepts any length up to its position table
    model = make().eval()
    ids = tm.token_ids(3)  # EOTs at 4, 7, 10 of 16
    vleff.get_method(method).apply(model, towers="text", **METHODS[method])
    with torch.no_grad():
        full = encode(model, ids)
        for length in (11, 13):
            torch.testing.assert_close(encode(model, ids[:, :length]), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(ENCODERS))
def test_eot_never_merged_and_padding_merges_only_with_padding(family):
    make, encode = ENCODERS[family]
    model = make().eval()
    ids = tm.token_ids(3)
    vleff.apply_tome(model, r=4, towers="text")
    with torch.no_grad():
        encode(model, ids)
    state = last_token_state(model, "text")
    source = state.get(SOURCE)  # [B, N, N0]
    eot = ids.argmax(dim=1)
    for b in range(ids.shape[0]):
        holders = source[b, :, eot[b]].nonzero().flatten()
        assert len(holders) == 1
        assert int(source[b, holders[0]].sum()) == 1  # the EOT's token holds the EOT alone
        assert int(state.get(PROTECTED)[b, holders[0]]) == 1
        pad_pos = torch.arange(ids.shape[1]) > eot[b]
        for token in range(source.shape[1]):
            parts = source[b, token] > 0
            assert bool(pad_pos[parts].all()) or not bool(pad_pos[parts].any()), "padding merged with a real token"
            assert int(state.get(PAD)[b, token]) == int(bool(pad_pos[parts].all()))
    assert bool((source.sum(dim=1) == 1).all())  # every input position in exactly one token


def test_pruned_text_tower_equals_the_library_blocks_on_the_kept_tokens():
    """EViT (no fusion) at block 0 of the open_clip text tower against an independent forward:
    the library's own modules, the kept tokens chosen from the library's attention weights
    (``need_weights``), and block 1 run by the library with the causal mask of the positions."""
    model = tm.open_clip_model().eval()
    ids = tm.token_ids(1, seed=3)[:, :]  # one caption, EOT at 4
    keep_rate = 0.5
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        blocks = model.transformer.resblocks
        b0 = blocks[0]
        h = b0.ln_1(x)
        causal = model.attn_mask
        attn_out, weights = b0.attn(h, h, h, attn_mask=causal, need_weights=True, average_attn_weights=True)
        x = x + b0.ls_1(attn_out)
        eot = int(ids[0].argmax())
        scores = weights[0, eot, :eot]  # real tokens before the EOT
        k = int(torch.ceil(torch.tensor(keep_rate * eot)))
        kept = sorted(scores.topk(k).indices.tolist()) + [eot]
        x = x[:, kept]
        x = x + b0.ls_2(b0.mlp(b0.ln_2(x)))
        pos = torch.tensor(kept)
        mask = torch.zeros(len(kept), len(kept)).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
        for block in blocks[1:]:
            x = block(x, attn_mask=mask)
        x = model.ln_final(x)
        expected = x[0, -1] @ model.text_projection

        vleff.apply_evit(model, keep_rate=keep_rate, locations=[0], fuse=False, towers="text")
        got = model.encode_text(ids)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_text_tower_refusals_name_the_tower():
    with pytest.raises(TypeError, match="towers='text'"):
        vleff.apply_tome(tm.timm_vit(), towers="text")
    with pytest.raises(ValueError, match="towers='text'"):
        vleff.apply_dynamicvit(tm.open_clip_model(), towers="text")


def test_towers_all_patches_both_towers_and_remove_restores_both():
    model = tm.open_clip_model().eval()
    ids, images = tm.token_ids(), tm.images()
    with torch.no_grad():
        ref_t, ref_i = model.encode_text(ids), model.encode_image(images)
        vleff.apply_tome(model, r=2, towers="all")
        model.encode_text(ids), model.encode_image(images)
        counts = vleff.token_counts(model)
        assert counts["text"][-1] < 16 and counts["image"][-1] < 17
        vleff.remove_tome(model)
        torch.testing.assert_close(model.encode_text(ids), ref_t, atol=0, rtol=0)
        torch.testing.assert_close(model.encode_image(images), ref_i, atol=0, rtol=0)
