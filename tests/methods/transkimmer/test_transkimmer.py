"""Transkimmer: the predictor and its count, the training forward and skim loss against a plain-PyTorch
re-computation, forwarded states, inference (real drop) against the same re-computation and against the
mask path, what differs from the reference's masking, settings, Lightning.

The re-computation (:func:`_plain_forward`) runs a timm ViT block by block in float64 from its weights:
a skim predictor on every non-cls token of the block input, ``m_l = decision · m_{l−1}`` (cls 1),
attention where kept queries attend to kept keys only (each token also to itself), then
``x ← x_in·(1 − m) + block(x_in)·m``; the final norm last.
"""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F

from vleff.backbones import last_token_state
from vleff.backbones.block import keep_masked_softmax
from vleff.methods.transkimmer.core import (
    MODULE_NAME,
    SkimPredictor,
    TranskimmerConfig,
    apply_transkimmer,
    predictor_parameters,
    remove_transkimmer,
    skim_probability,
    transkimmer_predictors,
)
from vleff.tokens.aux import pop_aux_losses


# --- the plain-PyTorch re-computation ------------------------------------------------------------------
def _predict(pred: SkimPredictor, x: torch.Tensor) -> torch.Tensor:
    ln1, lin1, ln2, _, lin2 = pred.net
    h = F.layer_norm(x, (x.shape[-1],), ln1.weight, ln1.bias, ln1.eps)
    h = F.layer_norm(F.linear(h, lin1.weight, lin1.bias), (x.shape[-1],), ln2.weight, ln2.bias, ln2.eps)
    return F.linear(F.gelu(h), lin2.weight, lin2.bias)  # [..., (skip, keep)]


def _block(blk, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    heads = blk.attn.num_heads
    h = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    allowed = m.bool()[:, None, None, :] | torch.eye(n, dtype=torch.bool)
    attn = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    o = F.linear((attn @ v).transpose(1, 2).reshape(b, n, c), blk.attn.proj.weight, blk.attn.proj.bias)
    y = x + o
    z = F.layer_norm(y, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    return y + F.linear(F.gelu(F.linear(z, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def _plain_forward(model, images: torch.Tensor, decide) -> tuple[torch.Tensor, list[torch.Tensor]]:
    predictors = transkimmer_predictors(model)[0].predictors
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    prev = torch.ones(x.shape[:2], dtype=x.dtype)
    masks = []
    for blk, pred in zip(model.blocks, predictors):
        m = torch.cat([torch.ones_like(prev[:, :1]), decide(_predict(pred, x[:, 1:]))], dim=1) * prev
        masks.append(m)
        x = x * (1 - m[..., None]) + _block(blk, x, m) * m[..., None]
        prev = m
    return F.layer_norm(x, (x.shape[-1],), model.norm.weight, model.norm.bias, model.norm.eps), masks


def _gumbel(logits: torch.Tensor) -> torch.Tensor:
    return F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 1]


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return (logits[..., 1] > logits[..., 0]).to(logits.dtype)


def _model(init_bias: float = 0.3, **settings):
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3).double()
    apply_transkimmer(model, init_bias=init_bias, **settings)
    return model


# --- the predictor --------------------------------------------------------------------------------------
def test_predictor_parameters_match_the_analytic_count_and_methods_next_figures():
    assert predictor_parameters(768) == 595_202 == sum(p.numel() for p in SkimPredictor(768).parameters())
    assert 12 * predictor_parameters(768) == 7_142_424  # ViT-B/16: one predictor per block
    assert predictor_parameters(512) == 265_730
    model = tm.timm_vit(depth=3)
    before = sum(p.numel() for p in model.parameters())
    apply_transkimmer(model)
    assert sum(p.numel() for p in model.parameters()) - before == 3 * (64 * 64 + 7 * 64 + 2)
    apply_transkimmer(model, locations=[1])
    assert sum(p.numel() for p in model.parameters()) - before == 64 * 64 + 7 * 64 + 2


def test_unbalanced_init_keeps_almost_everything():
    torch.manual_seed(0)
    last = SkimPredictor(256).net[-1]
    assert last.bias[1].item() == pytest.approx(5.0, abs=0.1) and last.bias[0].item() == pytest.approx(-5.0, abs=0.1)
    assert last.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert skim_probability(5.0) == pytest.approx(4.54e-5, rel=1e-2)  # METHODS-next: 1/(1+e^10)


# --- training: masked forward, forwarded states, skim loss -----------------------------------------------
def test_training_forward_and_skim_loss_equal_the_plain_recomputation():
    model = _model().train()
    images = tm.images(3).double()
    torch.manual_seed(7)
    out = model.forward_features(images)
    loss = pop_aux_losses(model)["transkimmer/skim"]
    torch.manual_seed(7)  # the same Gumbel noise, drawn in the same order
    ref, masks = _plain_forward(model, images, _gumbel)
    kept = [int(m.sum()) for m in masks]
    assert kept[0] < masks[0].numel() and kept[-1] > 3, kept  # some skimmed, some kept at every block
    for prev, nxt in zip(masks, masks[1:]):
        assert bool((nxt <= prev).all())  # never comes back
    # every token, skimmed ones included; up to the keep-masked softmax's epsilon (1e-6)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    n = masks[0].shape[1]  # 17: the cls token counts, its mask is 1
    expected = 0.5 * sum(m.sum(dim=1).mean() / n for m in masks) / len(masks)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)
    (out.square().mean() + loss).backward()
    grad = transkimmer_predictors(model)[0].predictors[0].net[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0  # straight-through: the predictors learn


def test_skimmed_tokens_are_forwarded_with_their_state_at_the_last_block_that_kept_them():
    model = _model().train()
    images = tm.images(2).double()
    states = []
    model.blocks[0].register_forward_pre_hook(lambda mod, args: states.append(args[0]))
    for blk in model.blocks[1:]:
        blk.register_forward_pre_hook(lambda mod, args: states.append(args[0]))
    torch.manual_seed(3)
    last = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(images))))
    masks = last_token_state(model).scratch["transkimmer"]["masks"]
    for layer, m in enumerate(masks):
        newly = (m == 0) & ((masks[layer - 1] == 1) if layer else torch.ones_like(m, dtype=torch.bool))
        assert newly.any()
        torch.testing.assert_close(last[newly], states[layer][newly], atol=0, rtol=0)


# --- inference: deterministic, real drop ---------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_drop_equals_the_plain_recomputation_and_the_mask_path(batch):
    model = _model(init_bias=0.05).eval()  # about a third of the tokens skimmed per block
    images = tm.images(batch, seed=2).double()
    with torch.no_grad():
        ref, masks = _plain_forward(model, images, _argmax)
        dropped = model.forward_features(images)
        counts = last_token_state(model).token_counts
        again = model.forward_features(images)  # deterministic: no Gumbel noise in eval
        sd = model.state_dict()
        apply_transkimmer(model, init_bias=0.05, eval_mode="mask")
        model.load_state_dict(sd)
        masked = model.forward_features(images)
        mask_counts = last_token_state(model).token_counts
    torch.testing.assert_close(dropped, again, atol=0, rtol=0)
    # each sample runs its kept tokens; at batch 3 the others are padded with fillers they skim (masked)
    torch.testing.assert_close(dropped, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(masked, ref, atol=1e-12, rtol=1e-12)
    # the tokens each block runs: as many as the sample that keeps the most (batch 1: its kept tokens)
    assert counts == [int(m.sum(dim=1).max()) for m in masks]
    if batch > 1:  # fewer than the union of what the samples keep
        assert all(c < int(m.bool().any(dim=0).sum()) for c, m in zip(counts, masks)), counts
    assert 1 < counts[-1] < counts[0] < 17 and mask_counts == [17, 17, 17], counts
    assert dropped.shape == (batch, 17, 64)  # every token back at its input position


def test_nothing_is_skimmed_at_the_default_init():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3).eval()
    with torch.no_grad():
        ref = model(tm.images(4))
        apply_transkimmer(model)
        torch.testing.assert_close(model(tm.images(4)), ref, atol=0, rtol=0)
    assert last_token_state(model).token_counts == [17, 17, 17]


# --- what differs from the reference's masking -----------------------------------------------------------
def test_vleff_masking_is_the_reference_masking_renormalised_over_kept_keys():
    """The reference multiplies the probabilities of kept queries by ``m`` on the key axis after the
    softmax, without renormalising; vleff's keep-masked softmax divides those rows by their sum (so
    the masked training forward equals the real drop at inference). Rows of skimmed queries differ
    more (vleff: attend to themselves), but their outputs are discarded (their state is forwarded)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1]], dtype=torch.float64)
    reference = logits.softmax(dim=-1) * m[:, None, None, :]
    ours = keep_masked_softmax(logits, m)
    kept_rows = m.bool()[:, None, :, None].expand_as(ours)
    renormalised = reference / reference.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(ours[kept_rows], renormalised[kept_rows], atol=1e-6, rtol=0)
    assert not torch.allclose(reference[kept_rows], renormalised[kept_rows])


# --- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"skim_coefficient": -0.5}, r"skim_coefficient=-0.5 is not allowed; it must be a finite number >= 0"),
        ({"tau": 0}, r"tau=0 is not allowed; it must be a finite number > 0"),
        ({"init_bias": float("inf")}, r"init_bias=inf is not allowed; it must be a finite number"),
        ({"eval_mode": "soft"}, r"eval_mode='soft' is not allowed; use one of \('drop', 'mask'\)"),
        ({"locations": [1, 1]}, r"locations=\[1, 1\] must be strictly increasing"),
        ({"towers": "audio"}, r"towers='audio' is not allowed; use one of \('image', 'text', 'all'\)"),
    ],
)
def test_bad_settings_are_refused_naming_setting_value_and_rule(bad, message):
    with pytest.raises(ValueError, match=message):
        TranskimmerConfig(**bad)


def test_locations_outside_the_tower_and_towers_without_cls_are_refused_before_any_change():
    model = tm.timm_vit(depth=3)
    with pytest.raises(ValueError, match=r"locations=\[3\]: 3 is not a block index in \[0, 3\)"):
        apply_transkimmer(model, locations=[3])
    gap = tm.timm_vit(depth=3, class_token=False, global_pool="avg")
    with pytest.raises(TypeError, match="has none"):
        apply_transkimmer(gap)
    for m in (model, gap):
        assert not hasattr(m, MODULE_NAME)
        with pytest.raises(ValueError, match="not applied"):
            remove_transkimmer(m)


def test_locations_and_coefficient_act():
    model = _model(locations=[1], skim_coefficient=2.0).train()
    torch.manual_seed(0)
    model(tm.images(2).double())
    masks = last_token_state(model).scratch["transkimmer"]["masks"]
    loss = pop_aux_losses(model)["transkimmer/skim"]
    assert len(masks) == 1
    torch.testing.assert_close(loss, 2.0 * masks[0].sum(dim=1).mean() / 17)


# --- Lightning -----------------------------------------------------------------------------------------
def test_callback_adds_the_skim_loss_and_trains_the_predictors(tmp_path):
    from vleff.callbacks import Transkimmer

    torch.manual_seed(0)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [Transkimmer(init_bias=0.0)], max_steps=2)
    trainer.fit(module, tl.loader(8))
    assert "train/aux/transkimmer/skim" in trainer.callback_metrics
    predictors = transkimmer_predictors(module.model)
    assert len(predictors) == 1 and all(p.grad is not None for p in predictors[0].parameters())


def test_mixin_adds_the_predictors_and_its_loss(tmp_path):
    from vleff.callbacks import TranskimmerMixin

    class Module(TranskimmerMixin, tl.TinyClassifier):
        def __init__(self):
            super().__init__()
            self.use_transkimmer(init_bias=0.0)

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen = self.vleff_aux_loss()
            return loss + self.seen

    torch.manual_seed(0)
    module = Module()
    assert any(MODULE_NAME in n for n, _ in module.named_parameters())
    tl.trainer(tmp_path, max_steps=1).fit(module, tl.loader(4))
    assert 0 < module.seen.item() <= 0.5


def test_experiment_config_composes_and_trains(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from vleff.cli.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=vit_transkimmer"])
    callback = instantiate(cfg.callbacks.transkimmer)
    assert callback.config == TranskimmerConfig()  # the YAML holds the defaults


# --- text towers: the EOT protected, causal order kept ------------------------------------------------
def _text_model(**settings):
    torch.manual_seed(0)
    model = tm.open_clip_model().eval().double()
    apply_transkimmer(model, towers="text", **settings)
    return model


def _text_state(model):
    from vleff.backbones import find_towers, get_patch

    return get_patch(find_towers(model, "text")[0].root).state


@pytest.mark.parametrize("batch", [1, 3])
def test_text_tower_never_skims_the_eot_and_drop_equals_mask(batch):
    ids = tm.token_ids(batch)
    eot = ids.argmax(dim=1)
    model = _text_model(init_bias=-0.1)
    with torch.no_grad():
        dropped = model.encode_text(ids)
        state = _text_state(model)
        counts, masks = state.token_counts, state.scratch["transkimmer"]["masks"]
        sd = model.state_dict()
        apply_transkimmer(model, towers="text", init_bias=-0.1, eval_mode="mask")
        model.load_state_dict(sd)
        masked = model.encode_text(ids)
        full = _text_state(model).scratch["transkimmer"]["masks"]
    assert all(bool((m[torch.arange(batch), eot] == 1).all()) for m in full)  # the pooled token stays
    assert counts[-1] < 16 and bool((full[-1].sum(dim=1) < eot + 1).all())  # real tokens skimmed, some removed
    assert len(masks) == len(full) == 2
    torch.testing.assert_close(dropped, masked, atol=1e-12, rtol=1e-12)


def test_text_embedding_does_not_depend_on_what_follows_the_eot():
    ids = tm.token_ids(3)
    other = ids.clone()
    after = torch.arange(16)[None, :] > ids.argmax(dim=1, keepdim=True)
    other[after] = 7  # real-looking tokens after the EOT instead of padding
    model = _text_model(init_bias=-0.1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(other), model.encode_text(ids), atol=1e-12, rtol=0)
        for i in range(3):  # one sample alone runs its kept tokens only
            torch.testing.assert_close(
                model.encode_text(other[i : i + 1]), model.encode_text(ids[i : i + 1]), atol=1e-12, rtol=0
            )


def test_causal_decoders_are_refused():
    model = tm.hf_blip_captioning()
    with pytest.raises(ValueError, match="causal decoder"):
        apply_transkimmer(model, towers="text")
    assert not any(MODULE_NAME in n for n, _ in model.named_parameters())


def test_update_changes_the_coefficient_and_eval_mode_keeping_the_predictors():
    import vleff.registry

    model = _model(init_bias=0.05)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    vleff.registry.update(model, "transkimmer", skim_coefficient=1.0, eval_mode="mask")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    model.train()
    torch.manual_seed(0)
    model(tm.images(2).double())
    masks = last_token_state(model).scratch["transkimmer"]["masks"]
    expected = sum(m.sum(dim=1).mean() / 17 for m in masks) / len(masks)
    torch.testing.assert_close(pop_aux_losses(model)["transkimmer/skim"], expected)
    model.eval()
    with torch.no_grad():
        model(tm.images(2).double())
    assert last_token_state(model).token_counts == [17, 17, 17]  # masked, not removed
    with pytest.raises(ValueError, match="locations"):
        vleff.registry.update(model, "transkimmer", locations=[0])
