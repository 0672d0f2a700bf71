"""Token methods on causal text towers, and cross-tower state between steps (issue 24: 1, 3, 11).

* A causal *decoder* (BLIP's ``text_decoder``) predicts at every position: a reduction must not
  let the output at a position depend on a later token. ToMe and MADTP (whole-sequence
  decisions) are refused on it, at apply time and when a tower runs as one; EViT is allowed and
  stays causal. The check is the property itself, computed here: change only token ``t`` and
  compare the logits at positions ``< t`` (float64, identical weights).
* MADTP's callback calibrates τ at the start of a stand-alone validate / test / predict.
* CrossGET's and MADTP's pending cross-tower features expire once a backward pass consumed the
  forward that left them (or an optimizer step changed the method's parameters), so a later,
  unrelated forward never pairs with them.
"""
from __future__ import annotations

import pytest
import torch

import tiny_models as tm
import vleff
from vleff.backbones import token_counts

T = 9  # the token that changes
N = 12


def _captions() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 90, (2, N), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 98
    return ids, torch.ones_like(ids)


def _changed(ids: torch.Tensor, t: int) -> torch.Tensor:
    out = ids.clone()
    out[:, t] = (out[:, t] + 7) % 89 + 1
    return out


def _captioning(train: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return tm.hf_blip_captioning().double().train(train)


def _decoder_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced captioning logits (the decoder runs with ``is_decoder=True``, no cache)."""
    with torch.no_grad():
        return model(pixel_values=tm.images(2).double(), input_ids=ids, attention_mask=mask, labels=ids).logits


def _assert_causal(model: torch.nn.Module, t: int = T, seen: bool = True) -> None:
    """Changing only token ``t`` leaves the logits before ``t`` unchanged (and, ``seen``, changes
    those from ``t`` on: the token is not dropped)."""
    ids, mask = _captions()
    before = _decoder_logits(model, ids, mask)
    after = _decoder_logits(model, _changed(ids, t), mask)
    if seen:
        assert not torch.allclose(before[:, t:], after[:, t:])
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-12, rtol=0)


# --- item 1: causal decoders ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["tome", "madtp"])
def test_whole_sequence_reducers_are_refused_on_a_causal_decoder_at_apply(method):
    model = _captioning()
    apply = {"tome": lambda: vleff.apply_tome(model, r=2, towers="text"),
             "madtp": lambda: vleff.apply_madtp(model, tau=1e3)}[method]
    with pytest.raises(ValueError, match=r"towers='(text|all)'.*causal decoder.*towers='image'"):
        apply()
    assert token_counts(model) == {} and not vleff.tokens.common.hooks_named(model, method)


@pytest.mark.parametrize("method", ["tome", "madtp"])
def test_whole_sequence_reducers_are_refused_when_a_text_tower_runs_as_a_decoder(method):
    """A tower applied to on its own (no parent to tell) or a text encoder called with
    ``is_decoder=True``: refused when it runs, with the method named; as an encoder it reduces."""
    torch.manual_seed(0)
    model = tm.hf_blip_vqa().double().eval()  # its text_encoder is the pair's text tower
    if method == "tome":
        vleff.apply_tome(model.text_encoder, r=2, towers="text")
    else:
        vleff.apply_madtp(model, tau=1e3)
    ids, mask = _captions()
    image = model.vision_model(pixel_values=tm.images(2).double()).last_hidden_state
    with torch.no_grad():
        model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image)
        assert token_counts(model.text_encoder)["text"][-1] < N
        with pytest.raises(RuntimeError, match=f"{'ToMe' if method == 'tome' else 'MADTP'} cannot reduce.*causal decoder"):
            model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image, is_decoder=True)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_evit_on_the_blip_decoder_stays_causal(train):
    model = _captioning(train)
    vleff.apply_evit(model, keep_rate=0.5, locations=[0], towers="text")
    _assert_causal(model, seen=False)  # token 9 is dropped (EViT keeps the first words on a decoder)
    assert token_counts(model)["text"] == [N, 1 + 6 + 1]  # [DEC], 6 of 11 words, the fused token
    _assert_causal(model, t=3)  # a kept token


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_madtp_on_the_image_tower_of_a_captioning_model_keeps_the_decoder_causal(train):
    model = _captioning(train)
    vleff.apply_madtp(model, towers="image", tau=1e3)
    _assert_causal(model)
    counts = token_counts(model)
    assert counts["image"][-1] < counts["image"][0] and counts["text"] == [N, N]
