"""MADTP: pruning against a plain-PyTorch reference, batch independence, text layout, the
alignment loss against a hand computation, the FLOPs controller against an independent count,
bad input, and the callback's exact resume."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from vleff.tokens.madtp import (
    FILLER,
    MADTPConfig,
    apply_madtp,
    calibrate_madtp,
    image_forward,
    madtp_applied,
    madtp_tau,
    measure_flops,
    pair_forward,
    update_madtp,
)

from vleff.backbones import find_pair, token_counts
from vleff.profile import count_flops
from vleff.tokens.aux import pop_aux_losses

PAIRS = {"open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model, "hf_blip": tm.hf_blip_retrieval}


def _batch(family: str, batch: int = 2):
    if family == "hf_blip":
        ids, mask = tm.blip_token_ids(batch)
    else:
        ids = tm.token_ids(batch)
        mask = (ids != 0).long()
    return tm.images(batch), ids, mask


def _model(family: str, **settings):
    torch.manual_seed(0)
    model = PAIRS[family]().eval()
    apply_madtp(model, **{"tau": 1e3, **settings})
    return model


# --- the pruning step against a plain-PyTorch reference ----------------------------------------------
def _reference_blocks(visual, x, module, tau):
    """MADTP's documented algorithm on open_clip's vision blocks, written out (batch maximum)."""
    for i, blk in enumerate(visual.transformer.resblocks):
        a = module.proj["image"][i](x[:, 1:])
        t = a @ module.codebook.t()
        h = blk.ln_1(x)
        mha = blk.attn
        b, n, c = h.shape
        q, k, v = (
            F.linear(h, mha.in_proj_weight, mha.in_proj_bias).reshape(b, n, 3, mha.num_heads, -1).permute(2, 0, 3, 1, 4)
        )
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = attn @ v
        x = x + mha.out_proj(o.transpose(1, 2).reshape(b, n, c))
        recv = attn[:, :, 1:, 1:].max(1)[0].sum(1)
        recv = recv / recv.sum(1, keepdim=True)
        code = t.max(2)[0]
        code = code / code.sum(1, keepdim=True)  # raw scores over their sum, as the reference
        hw = o[:, :, 1:].norm(dim=-1)
        cls = (attn[:, :, 0, 1:] * hw / hw.sum(1, keepdim=True)).sum(1)
        s = (recv + code + cls) / 3
        thr = (torch.softmax(t / tau, dim=1).transpose(1, 2) @ s[..., None]).min(1)[0]
        keep = int((s > thr).sum(1).max())
        if keep > 1 and n - 1 - keep > 1:  # the reference skips the block otherwise
            top = s.topk(keep, dim=1).indices.sort(1).values
            rest = torch.ones_like(s, dtype=torch.bool).scatter(1, top, False)
            w = s * rest
            w = w / w.sum(1, keepdim=True)
            patches = x[:, 1:]
            kept = patches.gather(1, top[..., None].expand(-1, -1, c))
            x = torch.cat([x[:, :1], kept, (w[..., None] * patches).sum(1, keepdim=True)], dim=1)
        x = x + blk.mlp(blk.ln_2(x))
    return x


@pytest.mark.parametrize("tau", [10.0, 1e3])
def test_pruning_equals_a_plain_reference(tau):
    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    images = tm.images(2)
    blocks = model.visual.transformer.resblocks
    seen = {}
    pre = blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    post = blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("y", out))
    apply_madtp(model, tau=tau, ragged="max", towers="image")
    with torch.no_grad():
        model.encode_image(images)
        madtp = seen["y"]
        ref = _reference_blocks(model.visual, seen["x"], model.vleff_madtp, tau)
    pre.remove(), post.remove()
    assert madtp.shape == ref.shape, (madtp.shape, ref.shape, token_counts(model))
    assert madtp.shape[1] < 17  # it pruned
    torch.testing.assert_close(madtp[:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)  # the pooled token
    torch.testing.assert_close(madtp[:, -1], ref[:, -1], atol=1e-5, rtol=1e-5)  # the fused token


# --- ragged keep counts -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(PAIRS))
def test_mask_mode_makes_each_sample_independent_of_its_batch(family):
    model = _model(family)
    pair = find_pair(model)
    images, ids, mask = _batch(family, 2)
    with torch.no_grad():
        both = pair_forward(pair, (images, ids, mask))
        counts = token_counts(model)
        alone = pair_forward(pair, (images[1:], ids[1:], mask[1:]))
        first = pair_forward(pair, (images[:1], ids[:1], mask[:1]))
    assert min(counts["image"]) < counts["image"][0] and min(counts["text"]) < counts["text"][0], counts
    for a, b, c in zip(both, first, alone):
        torch.testing.assert_close(a[1:], c, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a[:1], b, atol=1e-5, rtol=1e-4)


def test_max_mode_is_the_reference_batch_maximum_and_depends_on_the_batch():
    model = _model("open_clip", ragged="max", towers="image")
    pair = find_pair(model)
    images = torch.cat([tm.images(1, seed=3), tm.images(1, seed=4)])
    with torch.no_grad():
        both = pair.encode_image(images)
        n_both = token_counts(model)["image"]
        alone = [pair.encode_image(images[i : i + 1]) for i in range(2)]
        n_alone = [token_counts(model)["image"]]
    changed = any(not torch.allclose(both[i : i + 1], alone[i], atol=1e-5) for i in range(2))
    assert changed or n_both == n_alone[0]  # samples keep the batch's count, not their own
    assert FILLER not in (model.visual._vleff_patch.state.fields)


# --- text towers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["open_clip", "hf_clip", "hf_blip"])
def test_text_embedding_does_not_depend_on_padding(family):
    """The pooled token is kept and found, and padding never counts in the importance: CLIP
    captions with other ids after the EOT (no attention mask: only the causal mask hides them),
    BLIP captions with more padding, give the same embeddings."""
    model = _model(family, towers="text")
    pair = find_pair(model)
    images, ids, mask = _batch(family, 2)
    if family == "hf_blip":
        other = torch.cat([ids, torch.zeros(2, 4, dtype=ids.dtype)], dim=1)
        other_mask = torch.cat([mask, torch.zeros_like(mask[:, :4])], dim=1)
    else:
        after = torch.arange(ids.shape[1])[None] > ids.argmax(-1)[:, None]
        other = torch.where(after, torch.randint(1, 90, ids.shape, generator=torch.Generator().manual_seed(5)), ids)
        mask = other_mask = None
    with torch.no_grad():
        ref = pair_forward(pair, (images, ids, mask))[1]
        assert min(token_counts(model)["text"]) < ids.shape[1]
        out = pair_forward(pair, (images, other, other_mask))[1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_blip_text_is_pruned_before_cross_attention():
    model = _model("hf_blip", towers="text")
    images, ids, mask = _batch("hf_blip", 2)
    lengths = []
    block = model.text_encoder.encoder.layer[1].crossattention
    hook = block.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        pair_forward(find_pair(model), (images, ids, mask))
    hook.remove()
    counts = token_counts(model)["text"]
    assert counts[1] < ids.shape[1]
    assert lengths == [model.text_encoder._vleff_patch.state.num_tokens]  # cross-attention ran on the pruned text


# --- the alignment loss ---------------------------------------------------------------------------------
def _features_by_hand(model, family, images, ids, mask):
    """Σ_l softmax over content tokens of (proj_l(A)·codebookᵀ/√D)ᵀ · proj_l(A), from the block
    inputs of the *unpatched* model (no pruning: locations=())."""
    module = model.vleff_madtp
    pair = find_pair(model)
    feats = {}
    for modality, tower in (("image", pair.image_tower), ("text", pair.text_tower)):
        inputs = []
        hooks = [
            b.register_forward_pre_hook(
                lambda m, args, kw: inputs.append(kw.get("hidden_states", args[0] if args else None)), with_kwargs=True
            )
            for b in tower.blocks()
        ]
        saved = module.enabled
        module.enabled = False
        with torch.no_grad():
            pair_forward(pair, (images, ids, mask))
        module.enabled = saved
        for h in hooks:
            h.remove()
        total = 0
        for i, x in enumerate(inputs):
            if modality == "image" or family == "hf_blip":
                content = torch.ones(x.shape[:2], dtype=torch.bool)
                content[:, 0] = False
                if modality == "text":
                    content &= mask.bool()
            else:
                eot = ids.argmax(-1)
                content = torch.arange(x.shape[1])[None] <= eot[:, None]
            a = module.proj[modality][i](x)
            t = a @ module.codebook.t() / math.sqrt(module.codebook.shape[1])
            w = t.masked_fill(~content[..., None], float("-inf")).softmax(1)
            total = total + w.transpose(1, 2) @ a
        feats[modality] = total
    return feats


@pytest.mark.parametrize("family", ["open_clip", "hf_blip"])
def test_alignment_loss_equals_a_hand_computation_and_trains_the_codebook(family):
    model = _model(family, locations=(), align_weight=0.1)
    images, ids, mask = _batch(family, 2)
    feats = _features_by_hand(model, family, images, ids, mask)
    expected = 0.1 * (1 - F.cosine_similarity(feats["image"], feats["text"], dim=-1)).mean()
    model.train()
    pair_forward(find_pair(model), (images, ids, mask))
    losses = pop_aux_losses(model)
    assert set(losses) == {"madtp/align"}
    torch.testing.assert_close(losses["madtp/align"], expected, atol=1e-6, rtol=1e-5)
    losses["madtp/align"].backward()
    module = model.vleff_madtp
    assert module.codebook.grad is not None and module.codebook.grad.abs().sum() > 0
    for modality in ("image", "text"):
        proj = module.proj[modality][0]
        if hasattr(proj, "weight"):
            assert proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        pair_forward(find_pair(model), (images, ids, mask))
    assert pop_aux_losses(model) == {}  # evaluation records nothing


# --- the FLOPs controller ---------------------------------------------------------------------------------
def _deep_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=4, width=64, head_width=16, patch_size=8, image_size=64)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=32, heads=2, layers=3)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def test_calibration_hits_the_target_of_an_independent_flop_count():
    torch.manual_seed(0)
    model = _deep_clip().eval()
    batch = (tm.images(2, seed=1).repeat(1, 1, 2, 2), tm.token_ids(2), None)
    plain = copy.deepcopy(model)
    apply_madtp(model, flops_reduction=0.4)
    assert model.vleff_madtp.proj["text"][0].in_features == 32  # widths differ: per-block projections
    result = calibrate_madtp(model, [batch], max_evals=16)
    pair = find_pair(plain)
    baseline = count_flops(lambda: (pair.encode_image(batch[0]), pair.encode_text(batch[1])))
    assert result.baseline == baseline  # MADTP off costs exactly the library model
    assert abs(result.flops - 0.6 * baseline) <= 0.03 * 0.6 * baseline, result.evaluations
    assert madtp_tau(model) == result.tau
    assert measure_flops(model, [batch]) == result.flops  # the τ set is the τ measured
    update_madtp(model, tau=result.tau * 1e3)
    assert measure_flops(model, [batch]) < result.flops  # a higher τ prunes more
    image = calibrate_madtp(model, [batch], 0.4, forward=image_forward, max_evals=16)  # an image-tower target
    assert image.baseline == count_flops(lambda: pair.encode_image(batch[0]))
    assert image.error <= 0.03, image.evaluations


def test_single_samples_split_the_calibration_batches():
    from vleff.tokens.madtp import single_samples

    images, ids, mask = _batch("hf_blip", 2)
    out = single_samples([(images, ids, mask), (images, ids, mask)], 3)
    assert len(out) == 3 and all(b[0].shape[0] == 1 and len(b) == 3 for b in out)
    torch.testing.assert_close(out[2][1], ids[:1], atol=0, rtol=0)


def test_unreachable_target_warns_with_the_closest():
    model = _model("open_clip")
    with pytest.warns(RuntimeWarning, match="could not reach flops_reduction=0.95"):
        result = calibrate_madtp(model, [_batch("open_clip")], 0.95, max_evals=8)
    assert result.ratio > 0.05


# --- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, float("nan"), "half"])
def test_flops_reduction_outside_open_unit_interval_is_refused(value):
    with pytest.raises(ValueError, match=r"flops_reduction=.* must be a finite number > 0 and < 1"):
        MADTPConfig(flops_reduction=value)
    model = _model("open_clip")
    with pytest.raises(ValueError, match="flops_reduction"):
        calibrate_madtp(model, [_batch("open_clip")], value)


def test_single_tower_models_are_refused():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    for model in (
        tm.timm_vit(),
        CLIPVisionModel(
            CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        ),
    ):
        with pytest.raises(TypeError, match="needs both towers"):
            apply_madtp(model)
        assert not madtp_applied(model)


def test_stacking_with_another_token_method_is_refused():
    import vleff

    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    vleff.apply_evit(model, keep_rate=0.5, locations=[0])
    with pytest.raises(ValueError, match="cannot apply madtp while evit"):
        apply_madtp(model)
    # MADTP's hook reads the image tower even when only the text tower prunes (its alignment
    # feature): refused at apply (it used to apply and fail at the first image forward)
    with pytest.raises(ValueError, match="cannot apply madtp while evit is applied to open_clip image tower"):
        apply_madtp(model, towers="text")
    assert not madtp_applied(model)
    vleff.remove_evit(model)
    apply_madtp(model)
    with pytest.raises(ValueError, match="cannot apply evit while madtp is applied"):  # either order
        vleff.apply_evit(model, keep_rate=0.5, locations=[0])
    with pytest.raises(ValueError, match="locations"):
        apply_madtp(tm.open_clip_model(), locations=[5])


# --- Lightning: callback resume, mixin ---------------------------------------------------------------------
class _Captions(torch.utils.data.Dataset):
    def __init__(self, n: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.tokens = torch.randint(1, 400, (n, 16), generator=g)
        for i in range(n):
            self.tokens[i, 5 + i] = 49407
            self.tokens[i, 6 + i :] = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return {"images": self.images[i], "tokens": self.tokens[i], "caption_ids": torch.tensor(i)}


def _finetuner():
    from vleff.models.clip_finetuner import CLIPFineTuner, build_clip

    class ConstantLR(CLIPFineTuner):  # the app's cosine depends on the run length, which the test varies
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    clip = build_clip("digits-tiny", width=32, layers=2, embed_dim=16, patch_size=8, image_size=32, context_length=16)
    return ConstantLR(clip, context_length=16)


def _fit(tmp_path, steps: int, ckpt=None, save=None, **kwargs):
    from vleff.callbacks import MADTP

    module = _finetuner()
    callback = MADTP(flops_reduction=0.3, calibration_batches=1, max_evals=4, epoch_max_evals=2, **kwargs)
    trainer = tl.trainer(tmp_path, [callback], max_steps=steps, max_epochs=-1)
    loader = torch.utils.data.DataLoader(_Captions(), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 2-block tower cannot always reach the target
        trainer.fit(module, loader, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module, callback


def test_callback_calibrates_trains_the_codebook_and_resumes_exactly(tmp_path):
    straight, cb = _fit(tmp_path, 2)
    assert len(cb.controller.history) == 3  # before training, then after each (one-batch) epoch
    assert madtp_tau(straight.model) == cb.controller.tau
    ckpt = str(tmp_path / "half.ckpt")
    _fit(tmp_path, 1, save=ckpt)
    resumed, cb2 = _fit(tmp_path, 2, ckpt=ckpt)
    fresh = _finetuner().model
    fresh_sd = apply_madtp(fresh).state_dict()
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert cb2.controller.history == cb.controller.history  # restored, then continued identically
    assert madtp_tau(resumed.model) == madtp_tau(straight.model)
    codebook = "model.vleff_madtp.codebook"
    assert not torch.allclose(straight.state_dict()[codebook], fresh_sd["vleff_madtp.codebook"])  # trained
    assert straight.state_dict()["model.vleff_madtp._extra_state"] == {
        "tau": madtp_tau(straight.model),
        "start": straight.model.vleff_madtp.start,
        "calibrated": True,
    }


def _trained_reductions(module) -> list[float]:
    from vleff.tokens.common import hooks_named

    return hooks_named(module.model, "madtp")[0].config.flops_reduction


def test_warmup_ramps_the_trained_reduction_per_epoch_then_holds_the_target(tmp_path):
    """warmup_epochs=2 at flops_reduction 0.3: epochs train at 0.1, 0.2, then 0.3; the τ in use
    during each epoch is the one calibrated for that epoch's reduction."""
    from lightning.pytorch.callbacks import Callback

    from vleff.callbacks import MADTP

    seen: list[tuple[float, float]] = []

    class Record(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((_trained_reductions(pl_module), madtp_tau(pl_module.model)))

    module = _finetuner()
    callback = MADTP(flops_reduction=0.3, calibration_batches=1, max_evals=4, epoch_max_evals=2, warmup_epochs=2)
    trainer = tl.trainer(tmp_path, [callback, Record()], max_steps=4, max_epochs=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(module, torch.utils.data.DataLoader(_Captions(), batch_size=4))
    history = callback.controller.history
    ramp = [0.1, 0.2, 0.3, 0.3]
    assert [r for r, _ in seen] == pytest.approx(ramp)
    assert [h["flops_reduction"] for h in history] == pytest.approx(ramp + [0.3])  # + after the last epoch
    assert [t for _, t in seen] == [h["tau"] for h in history[:4]]
    assert madtp_tau(module.model) == history[-1]["tau"]


def test_a_run_shorter_than_the_warmup_ends_calibrated_at_the_target(tmp_path):
    module, callback = _fit(tmp_path, 1, warmup_epochs=5)
    history = callback.controller.history
    assert [h["flops_reduction"] for h in history] == pytest.approx([0.05, 0.1, 0.3])  # ramp, ramp, finish
    assert madtp_tau(module.model) == history[-1]["tau"] == callback.controller.tau
    assert _trained_reductions(module) == pytest.approx(0.3)


def test_warmup_settings_are_checked_and_resume_needs_the_same_ramp(tmp_path):
    from vleff.callbacks import MADTP

    with pytest.raises(ValueError, match="warmup_epochs=2 needs adjust_every_epoch=True"):
        MADTP(warmup_epochs=2, adjust_every_epoch=False)
    with pytest.raises(ValueError, match="warmup_epochs"):
        MADTP(warmup_epochs=-1)
    from vleff.tokens.madtp_controller import MADTPController

    with pytest.raises(ValueError, match="flops_reduction=0.5 but this controller has flops_reduction=0.3"):
        MADTPController(flops_reduction=0.3).load_state_dict({"tau": 1.0, "target": 0.5})  # the mixin's path
    ckpt = str(tmp_path / "ramp.ckpt")
    _fit(tmp_path, 1, save=ckpt, warmup_epochs=2)
    with pytest.raises(ValueError, match="warmup_epochs=2 but this controller has warmup_epochs=0"):
        _fit(tmp_path, 2, ckpt=ckpt)
    straight, cb = _fit(tmp_path, 3, warmup_epochs=2)
    resumed, cb2 = _fit(tmp_path, 3, ckpt=ckpt, warmup_epochs=2)
    assert cb2.controller.history == cb.controller.history
    assert madtp_tau(resumed.model) == madtp_tau(straight.model)


def test_mixin_adds_the_loss_with_one_call_and_checkpoints_the_controller(tmp_path):
    from vleff.callbacks import MADTPMixin
    from vleff.models.clip_finetuner import CLIPFineTuner, build_clip

    class Tuner(MADTPMixin, CLIPFineTuner):
        def __init__(self):
            torch.manual_seed(0)
            super().__init__(
                build_clip(
                    "digits-tiny", width=32, layers=2, embed_dim=16, patch_size=8, image_size=32, context_length=16
                ),
                lr=1e-3,
                context_length=16,
            )
            self.use_madtp(flops_reduction=0.3, calibration_batches=1, max_evals=4, epoch_max_evals=2)
            self.aux = []

        def training_step(self, batch, batch_idx):
            aux = self.vleff_aux_loss()
            loss = super().training_step(batch, batch_idx)
            aux = self.vleff_aux_loss()
            self.aux.append(float(aux))
            return loss + aux

    module = Tuner()
    trainer = tl.trainer(tmp_path, max_steps=2, max_epochs=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(module, torch.utils.data.DataLoader(_Captions(), batch_size=4))
    assert len(module.aux) == 2 and all(a > 0 for a in module.aux)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["vleff_madtp_controller"]
    assert state["tau"] == madtp_tau(module) and len(state["batches"]) == 1


def test_alignment_loss_is_torch_cosine_embedding_loss():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from vleff.tokens.madtp import alignment_loss

    @settings(max_examples=25, deadline=None)
    @given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**16))
    def check(b, codes, d, s):
        g = torch.Generator().manual_seed(s)
        a, c = torch.randn(b, codes, d, generator=g), torch.randn(b, codes, d, generator=g)
        ref = torch.nn.CosineEmbeddingLoss()(a.reshape(-1, d), c.reshape(-1, d), torch.ones(b * codes))
        torch.testing.assert_close(alignment_loss(a, c), ref, atol=1e-6, rtol=1e-5)
        assert alignment_loss(a, a).abs() < 1e-6 and 0 <= alignment_loss(a, -a) <= 2 + 1e-6

    check()


def test_controller_moves_the_first_pruning_block_when_the_lowest_tau_prunes_too_much(monkeypatch):
    """The search logic on a synthetic FLOPs curve: at every τ the cost is below the target until
    pruning starts at block 3 (each later start block adds 5 % of the baseline)."""
    import vleff.tokens.madtp as madtp

    model = _model("open_clip")
    module = model.vleff_madtp
    model.vleff_madtp.start = 0

    def fake(m, batches, forward=None):
        if not module.enabled:
            return 10_000
        ratio = 0.55 + 0.05 * module.start - 0.02 * min(max(math.log10(module.tau) + 4, 0), 10)
        return int(10_000 * ratio)

    monkeypatch.setattr(madtp, "measure_flops", fake)
    monkeypatch.setattr(
        madtp, "hooks_named", lambda m, n: [type("H", (), {"locations": (0, 1, 2, 3, 4), "config": MADTPConfig()})()]
    )
    result = calibrate_madtp(model, [_batch("open_clip")], 0.3, tau0=1.0)
    assert result.start == 3 and module.start == 3
    assert result.error <= 0.005, result.evaluations
