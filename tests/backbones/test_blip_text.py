"""BLIP text towers (post-norm BERT layers with image cross-attention) on the generic path.

Every check compares with the library's own forward: the patched tower with a no-op hook must
give the library's outputs and gradients (encoder with and without cross-attention, the causal
decoder, VQA's two text towers, generation with the key/value cache), and a hook that drops
padding between self- and cross-attention must give the library's output on the shortened text.
"""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from vleff.backbones import (
    BlockInfo,
    TokenState,
    TowerHook,
    find_towers,
    get_patch,
    last_token_state,
    patch_tower,
    unpatch_tower,
)
from vleff.backbones.blip_text import HFBlipTextAdapter
from vleff.backbones.text import PAD, SOURCE


class Noop(TowerHook):
    name = "noop"


class KeepFirst(TowerHook):
    """Keeps the first ``k`` tokens in block ``index``'s ``between`` (``reverse``: in reverse order,
    so the mask must be rebuilt from input positions, not from token indices)."""

    name = "keep_first"

    def __init__(self, k: int, index: int = 0, reverse: bool = False) -> None:
        self.k, self.index, self.reverse = k, index, reverse

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if info.index != self.index:
            return x
        idx = torch.arange(self.k, device=x.device)
        if self.reverse:
            idx = idx.flip(0)
        return state.select(x, idx.expand(x.shape[0], -1))


def _text_towers(model: torch.nn.Module) -> list[HFBlipTextAdapter]:
    return [t for t in find_towers(model, "text") if isinstance(t, HFBlipTextAdapter)]


def _image_embeds(model: torch.nn.Module) -> torch.Tensor:
    return model.vision_model(pixel_values=tm.images()).last_hidden_state


# (model builder, forward returning the library's outputs) for every way BLIP runs its text
def _itm(m):
    ids, mask = tm.blip_token_ids()
    return [m(input_ids=ids, pixel_values=tm.images(), attention_mask=mask).question_embeds]


def _itc(m):
    ids, mask = tm.blip_token_ids()
    out = m(input_ids=ids, pixel_values=tm.images(), attention_mask=mask, use_itm_head=False)
    return [out.itm_score, out.question_embeds]


def _caption(m):
    ids, mask = tm.blip_token_ids()
    out = m(pixel_values=tm.images(), input_ids=ids, attention_mask=mask, labels=ids)
    return [out.loss, out.logits]


def _caption_cached(m):  # no labels: the decoder runs with the library's key/value cache
    ids, mask = tm.blip_token_ids()
    return [m(pixel_values=tm.images(), input_ids=ids, attention_mask=mask).logits]


def _vqa(m):
    ids, mask = tm.blip_token_ids()
    answer, answer_mask = tm.blip_token_ids(length=10, seed=1)
    return [
        m(
            input_ids=ids,
            pixel_values=tm.images(),
            attention_mask=mask,
            labels=answer,
            decoder_attention_mask=answer_mask,
        ).loss
    ]


CASES = {
    "retrieval_itm": (tm.hf_blip_retrieval, _itm, 1),
    "retrieval_itc": (tm.hf_blip_retrieval, _itc, 1),
    "captioning_decoder": (tm.hf_blip_captioning, _caption, 1),
    "captioning_decoder_cache": (tm.hf_blip_captioning, _caption_cached, 1),
    "vqa_encoder_and_decoder": (tm.hf_blip_vqa, _vqa, 2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_patched_blip_text_reproduces_library_outputs_and_gradients(case, train):
    make, fwd, n_text = CASES[case]
    torch.manual_seed(0)
    model = make().train(train)
    params = [p for p in model.parameters()]
    ref = fwd(model)
    ref_grads = torch.autograd.grad(sum(o.float().square().mean() for o in ref), params, allow_unused=True)

    towers = _text_towers(model)
    assert len(towers) == n_text
    for tower in towers:
        patch_tower(tower).add_hook(Noop())
    out = fwd(model)
    grads = torch.autograd.grad(sum(o.float().square().mean() for o in out), params, allow_unused=True)
    for tower in towers:  # the generic post-norm path ran, once per block
        state = get_patch(tower.root).state
        assert state is not None and state.token_counts == [state.num_input_tokens] * len(tower.blocks())
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert sum(g is not None for g in ref_grads) > 10
    for ga, gb in zip(ref_grads, grads):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(gb, ga, atol=1e-5, rtol=1e-4)

    for tower in towers:
        assert unpatch_tower(tower.root)
        assert all("forward" not in b.__dict__ for b in tower.blocks())
    for a, b in zip(ref, fwd(model)):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_generation_with_the_cache_equals_library():
    torch.manual_seed(0)
    model = tm.hf_blip_captioning().eval()
    with torch.no_grad():
        ref = model.generate(pixel_values=tm.images(), max_new_tokens=5, do_sample=False)
        patch_tower(_text_towers(model)[0]).add_hook(Noop())
        out = model.generate(pixel_values=tm.images(), max_new_tokens=5, do_sample=False)
    assert ref.shape[1] > 2
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_towers_found_with_post_norm_layout_and_cls_pooling():
    model = tm.hf_blip_vqa()
    texts = _text_towers(model)
    assert [t.root for t in texts] == [model.text_encoder, model.text_decoder.bert]
    for t in texts:
        assert t.layout == "post_norm_cross" and t.pooling == "cls" and t.num_prefix_tokens == 1
        assert t.has_cls_token and t.id_embedding() is None
        pooled_at = t.eot_positions(torch.ones(3, 5, dtype=torch.long))
        torch.testing.assert_close(pooled_at, torch.zeros(3, dtype=torch.long), atol=0, rtol=0)


@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_padding_is_a_token_field_read_from_the_library_mask(role):
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().eval() if role == "encoder" else tm.hf_blip_captioning().eval()
    ids, mask = tm.blip_token_ids()
    patch_tower(_text_towers(model)[0]).add_hook(Noop())
    with torch.no_grad():
        if role == "encoder":
            model.text_encoder(input_ids=ids, attention_mask=mask)
        else:  # the causal mask hides later keys from early queries: padding is not "hidden from row 0"
            model.text_decoder(input_ids=ids, attention_mask=mask, use_cache=False)
    state = last_token_state(model, "text")
    torch.testing.assert_close(state.get(PAD), (mask == 0).long(), atol=0, rtol=0)


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("role", ["encoder_cross", "decoder"])
def test_dropping_padding_in_between_equals_library_on_shortened_text(role, index, reverse):
    """Dropping the trailing padding after block ``index``'s self-attention must change nothing
    the library computes on the shortened text: the padding mask follows the tokens, the
    decoder's causal order holds in any token order, the cross-attention reads the whole image,
    and the input layout comes back (dropped positions zero)."""
    torch.manual_seed(0)
    model = (tm.hf_blip_retrieval if role == "encoder_cross" else tm.hf_blip_captioning)().eval()
    ids, mask = tm.blip_token_ids()
    k = int(mask.sum(dim=1).max())  # every sample's real tokens
    assert k < ids.shape[1]
    tower = _text_towers(model)[0]

    def run(i, m):
        with torch.no_grad():
            if role == "encoder_cross":
                return model.text_encoder(
                    input_ids=i, attention_mask=m, encoder_hidden_states=_image_embeds(model)
                ).last_hidden_state
            return model.text_decoder(
                input_ids=i, attention_mask=m, encoder_hidden_states=_image_embeds(model), use_cache=False
            ).logits

    short = run(ids[:, :k], mask[:, :k])
    patch_tower(tower).add_hook(KeepFirst(k, index, reverse))
    out = run(ids, mask)
    state = get_patch(tower.root).state
    assert state.token_counts == [ids.shape[1]] * (index + 1) + [k] * (len(tower.blocks()) - index - 1)
    assert out.shape[1] == ids.shape[1]
    torch.testing.assert_close(out[:, :k], short, atol=1e-5, rtol=1e-5)
    if role == "encoder_cross":
        assert bool((out[:, k:] == 0).all())


def test_tome_keeps_padding_apart_and_evit_never_fuses_it_on_blip_text():
    import vleff

    ids, mask = tm.blip_token_ids()
    for apply in (
        lambda m: vleff.apply_tome(m, r=3, towers="text", trace_source=True),
        lambda m: vleff.apply_evit(m, keep_rate=0.5, locations=[0], towers="text"),
    ):
        torch.manual_seed(0)
        model = tm.hf_blip_retrieval().eval()
        apply(model)
        with torch.no_grad():
            out = model.text_encoder(
                input_ids=ids, attention_mask=mask, encoder_hidden_states=_image_embeds(model)
            ).last_hidden_state
        assert torch.isfinite(out).all()
        state = last_token_state(model, "text")
        assert state.token_counts[-1] < ids.shape[1]
        holds = state.get(SOURCE) > 0  # [B, N, N0]: input positions each token holds
        pad_in = (mask == 0)[:, None, :]
        real_part = (holds & ~pad_in).any(dim=2)
        pad_part = (holds & pad_in).any(dim=2)
        assert not bool((real_part & pad_part).any()), "a token holds padding and real text"
        torch.testing.assert_close(state.get(PAD).bool(), pad_part & ~real_part, atol=0, rtol=0)
        assert bool(holds[:, 0, 0].all()) and int(holds[:, 0].sum()) == ids.shape[0]  # [CLS] stays first, alone


def test_reduction_under_the_key_value_cache_is_refused():
    import vleff

    torch.manual_seed(0)
    model = tm.hf_blip_captioning().eval()
    ids, mask = tm.blip_token_ids()
    # EViT: the token method allowed on a causal decoder (ToMe and MADTP refuse one, see test_token_causal.py)
    vleff.apply_evit(model, keep_rate=0.5, locations=[0], towers="text")
    with torch.no_grad(), pytest.raises(RuntimeError, match="key/value cache"):
        model(pixel_values=tm.images(), input_ids=ids, attention_mask=mask)  # use_cache defaults to True
    with torch.no_grad():  # without the cache (training, use_cache=False) it runs
        model.text_decoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=_image_embeds(model), use_cache=False
        )
