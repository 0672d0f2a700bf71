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
import tiny_models as tm
import torch

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
    apply = {
        "tome": lambda: vleff.apply_tome(model, r=2, towers="text"),
        "madtp": lambda: vleff.apply_madtp(model, tau=1e3),
    }[method]
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
        with pytest.raises(
            RuntimeError, match=f"{'ToMe' if method == 'tome' else 'MADTP'} cannot reduce.*causal decoder"
        ):
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


# --- item 11: cross-tower state between steps ---------------------------------------------------------
@pytest.mark.parametrize("method", ["crossget", "madtp"])
def test_an_unpaired_forward_is_not_paired_with_the_next_step(method):
    """An image-only training step (forward, backward, optimizer step), then a text-first step:
    the text must pair with this step's image, not the stale one (whose graph is freed and whose
    weights changed: autograd failed before). The aux loss must equal the same step's loss
    computed again with no earlier forward pending."""
    torch.manual_seed(0)
    model = tm.open_clip_model().double().train()
    if method == "crossget":
        vleff.apply_crossget(model, r_image=2, r_text=2)
    else:
        vleff.apply_madtp(model, tau=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    img, ids = tm.images(2).double(), tm.token_ids(2)
    loss = model.encode_image(tm.images(2, seed=5).double()).square().mean() + vleff.vleff_aux_loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad()

    t, i = model.encode_text(ids), model.encode_image(img)
    aux = vleff.vleff_aux_loss(model)
    assert aux.requires_grad
    (t.square().mean() + i.square().mean() + aux).backward()  # before: autograd error

    model.encode_text(ids)  # the same step again, nothing pending: the same pairing
    model.encode_image(img)
    again = vleff.vleff_aux_loss(model)
    torch.testing.assert_close(aux.detach(), again.detach(), atol=1e-12, rtol=0)


# --- item 3: MADTP's callback in a stand-alone evaluation ------------------------------------------------
def _evaluated(tmp_path, stage: str, prepare=None):
    import warnings

    import tiny_lightning as tl

    from vleff.callbacks import MADTP

    class Evaluated(tl.TinyCLIP):
        def _step(self, batch):
            images, ids = batch
            return (self.model.encode_image(images) * 0).sum() + self.model.encode_text(ids).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val", self._step(batch))

        def test_step(self, batch, batch_idx):
            self.log("test", self._step(batch))

        def predict_step(self, batch, batch_idx):
            return self._step(batch)

    torch.manual_seed(0)
    module = Evaluated()
    if prepare is not None:
        prepare(module.model)
    callback = MADTP(flops_reduction=0.3, calibration_batches=1, max_evals=4)
    trainer = tl.trainer(tmp_path, [callback])
    loader = tl.pair_loader(4, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 2-block tower may not reach the target exactly
        getattr(trainer, stage)(module, loader)
    return module, callback, loader


@pytest.mark.parametrize("stage", ["validate"])  # test and predict take the same path
def test_madtp_callback_calibrates_before_a_standalone_evaluation(tmp_path, stage):
    """Without a fit, τ is calibrated on the stage's first batch: the model ends where
    ``calibrate_madtp`` on that batch puts the same model (before: τ stayed at its start, 1)."""
    import warnings

    from vleff.tokens.madtp import calibrate_madtp, madtp_tau

    module, callback, loader = _evaluated(tmp_path, stage)
    model = module.model
    assert model.vleff_madtp.calibrated and not callback.controller.calibrated  # a later fit calibrates anew
    expected = vleff.apply_madtp(tm.open_clip_model(), flops_reduction=0.3)
    expected.load_state_dict(model.state_dict())  # the same weights and codebook
    expected.vleff_madtp.tau, expected.vleff_madtp.start = 1.0, 0  # τ as applied
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = calibrate_madtp(expected.eval(), [next(iter(loader))], max_evals=4)
    assert madtp_tau(model) == result.tau != 1.0 and model.vleff_madtp.start == result.start


def test_madtp_callback_keeps_a_chosen_tau_in_an_evaluation(tmp_path):
    """A τ the user set (or a checkpoint or calibrate_madtp brought) is not recalibrated."""
    from vleff.tokens.madtp import madtp_tau

    def prepare(model):
        vleff.apply_madtp(model, flops_reduction=0.3)
        assert not model.vleff_madtp.calibrated and madtp_tau(model) == 1.0  # as applied: not chosen
        vleff.update(model, "madtp", tau=7.0)

    module, _, _ = _evaluated(tmp_path, "predict", prepare)
    assert madtp_tau(module.model) == 7.0 and module.model.vleff_madtp.calibrated
