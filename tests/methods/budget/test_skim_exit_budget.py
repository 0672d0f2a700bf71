"""``fit_budget`` on the data-dependent knobs: Transkimmer's keep threshold and MuE's exit threshold
(:attr:`vleff.registry.Budget.steps`: the steps are the scores the batches produce).

Each fit is checked against an independent count: a timm ViT's FLOPs from its shapes and what the
method did in the last forward (Transkimmer: the tokens each block and each predictor ran on; MuE:
how many blocks each sample ran), which equals vleff's counter exactly (asserted first); on a tiny
open_clip with both towers, MuE's count per tower and sample, and the baseline of a fresh unpatched
model.
"""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from test_fit_budget import PATCHES, D, images, vit

import vleff
from vleff.backbones import last_token_state, token_counts
from vleff.budget import fit_budget, measure_ratio
from vleff.flops import count_flops
from vleff.methods.mue import apply_mue, mue_exit_blocks
from vleff.methods.transkimmer.core import KEEP_CHANNEL, keep_margin, transkimmer_predictors
from vleff.registry import get_method

STEM = 2 * PATCHES * (3 * 8 * 8) * D + 2 * D * 10  # patch embedding, head (per sample)


def block(n: int, d: int = D) -> int:
    """One pre-norm block on ``n`` tokens: qkv + proj ``8nd²``, attention ``4n²d``, MLP ``16nd²``."""
    return 24 * n * d * d + 4 * n * n * d


def transkimmer_flops(model: torch.nn.Module) -> int:
    """One sample's FLOPs from the tokens each block ran on; each predictor reads the tokens that
    entered its block but the class token: ``Linear(d, d)`` and ``Linear(d, 2)``."""
    counts = token_counts(model)["image"]
    entering = [PATCHES + 1, *counts[:-1]]
    return STEM + sum(block(n) + 2 * (m - 1) * (D * D + 2 * D) for n, m in zip(counts, entering))


def mue_flops(model: torch.nn.Module) -> int:
    return sum(STEM + int(k) * block(PATCHES + 1) for k in mue_exit_blocks(model)["image"])


def test_the_independent_counts_equal_the_counter():
    model, x = vit(), images(1)
    vleff.apply_transkimmer(model, keep_threshold=0.99995)  # untrained predictors: margins near 10
    assert count_flops(model, x) == transkimmer_flops(model)
    assert token_counts(model)["image"][-1] < PATCHES + 1  # it did skim
    model, x = vit(), images(8)
    apply_mue(model, image_threshold=0.9997)
    assert count_flops(model, x) == mue_flops(model)


@pytest.mark.parametrize("target", [0.6])
def test_transkimmer_lands_within_two_percent_by_the_independent_count(target):
    model, x = vit(), images(1)
    plain = count_flops(vit(), x)
    vleff.apply_transkimmer(model)
    fit = fit_budget(model, [x], flops=target)
    with torch.no_grad():
        model(x)
    ratio = transkimmer_flops(model) / plain
    assert abs(ratio - target) <= 0.02 * target
    assert fit.ratio == pytest.approx(ratio, rel=1e-12) and fit.baseline == plain
    assert get_method("transkimmer").applied_settings(model)["keep_threshold"] == fit.settings["keep_threshold"]


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_mue_lands_within_two_percent_by_the_independent_count(target):
    model, x = vit(), images(64)  # 64 samples × 6 blocks: each exit moves the FLOPs by < 1.4 %
    plain = count_flops(vit(), x)
    apply_mue(model)
    fit = fit_budget(model, [x], flops=target)
    with torch.no_grad():
        model(x)
    ratio = mue_flops(model) / plain
    assert abs(ratio - target) <= 0.02 * target
    assert fit.ratio == pytest.approx(ratio, rel=1e-12)
    # a lower threshold never runs more blocks: the steps are exact for MuE
    ordered = [r for _, r in sorted(fit.evaluations)]
    assert all(b <= a for a, b in zip(ordered, ordered[1:]))


def clip_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([tm.token_ids(4, seed=s) for s in range(batch // 4)])
    return tm.images(batch), ids


def test_mue_fits_both_towers_of_an_open_clip_by_the_independent_count():
    torch.manual_seed(0)
    model = tm.open_clip_model(vision_layers=4, text_layers=4).eval()
    plain = copy.deepcopy(model)
    images_, ids = clip_batch(32)
    apply_mue(model, towers="all")
    fit = fit_budget(model, [(images_, ids)], flops=0.6)
    assert set(fit.settings) == {"image_threshold", "text_threshold"}
    assert fit.error <= 0.02
    with torch.no_grad():
        full = count_flops(lambda: (plain.encode_image(images_), plain.encode_text(ids)))
        model.encode_image(images_)
        model.encode_text(ids)
    blocks = mue_exit_blocks(model)
    # each block a sample skips saves that tower's block on that sample: 17 image, 16 text tokens, width 64
    saved = sum((4 - int(k)) * block(17, 64) for k in blocks["image"])
    saved += sum((4 - int(k)) * block(16, 64) for k in blocks["text"])
    assert fit.baseline == full
    assert fit.ratio == pytest.approx((full - saved) / full, rel=1e-12)
    assert (blocks["image"] < 4).any() and (blocks["text"] < 4).any()  # both towers exit


def test_transkimmer_fits_both_towers_of_an_open_clip():
    torch.manual_seed(0)
    model = tm.open_clip_model(vision_layers=4, text_layers=4).eval()
    plain = copy.deepcopy(model)
    images_, ids = clip_batch(4)
    batches = [(images_[i : i + 1], ids[i : i + 1]) for i in range(2)]  # one sample each: only its kept tokens run
    vleff.apply_transkimmer(model, towers="all")
    fit = fit_budget(model, batches, flops=0.6)
    assert fit.error <= 0.02
    with torch.no_grad():
        full = sum(count_flops(lambda b=b: (plain.encode_image(b[0]), plain.encode_text(b[1]))) for b in batches)
    assert fit.baseline == full  # the search's baseline is the unpatched model's count
    assert measure_ratio(model, batches) == pytest.approx(fit.ratio, rel=1e-12)


def test_the_default_threshold_is_the_papers_argmax():
    """At 0.5 the first predictor keeps exactly the tokens whose keep logit is the larger."""
    torch.manual_seed(1)
    model, x = vit(), images(1)
    vleff.apply_transkimmer(model, init_bias=0.0, locations=[0])  # undecided predictors: some skim
    with torch.no_grad():
        model(x)
        tokens = model._pos_embed(model.patch_embed(x))
        logits = transkimmer_predictors(model)[0].predictors[0](model.norm_pre(tokens)[:, 1:])
    kept = int((logits.argmax(-1) == KEEP_CHANNEL).sum())
    assert 0 < kept < PATCHES
    assert token_counts(model)["image"][0] == 1 + kept
    assert keep_margin(0.5) == 0.0


def test_unreachable_targets_name_the_closest_and_why_and_change_nothing():
    model, x = vit(), images(1)
    vleff.apply_transkimmer(model)
    with pytest.raises(
        ValueError, match=r"flops=0.05 is out of reach for Transkimmer.*closest reachable is 0\.\d+x.*most reduction"
    ):
        fit_budget(model, [x], flops=0.05)  # the class token still runs every block, the predictors read the rest
    assert get_method("transkimmer").applied_settings(model)["keep_threshold"] == 0.5
    model = vit()
    apply_mue(model)
    with pytest.raises(ValueError, match=r"flops=0.05 is out of reach for MuE.*most reduction threshold allows"):
        fit_budget(model, [images(2)], flops=0.05)  # at best every sample runs one block of six
    with pytest.raises(ValueError, match="threshold moves in steps: the nearest settings give"):
        fit_budget(model, [images(2)], flops=0.5)  # two samples: coarse steps
    assert get_method("mue").applied_settings(model)["image_threshold"] == 1.0


@pytest.mark.parametrize("flops", [0, 1.5, -0.2, float("nan")])
def test_bad_budgets_are_refused(flops):
    for apply in (vleff.apply_transkimmer, apply_mue):
        model = vit()
        apply(model)
        with pytest.raises(ValueError, match=f"flops={flops}"):
            fit_budget(model, [images(1)], flops=flops)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high"])
def test_a_bad_keep_threshold_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="keep_threshold"):
        vleff.apply_transkimmer(vit(), keep_threshold=bad)
    model = vit()
    vleff.apply_transkimmer(model)
    with pytest.raises(ValueError, match="keep_threshold"):
        vleff.update(model, "transkimmer", keep_threshold=bad)


def test_a_copy_of_the_model_carries_no_forward_records():
    model, x = vit(), images(4)
    apply_mue(model, image_threshold=0.9997)
    with torch.no_grad():
        model(x)
    assert last_token_state(model) is not None
    assert last_token_state(copy.deepcopy(model)) is None  # fit_budget's baseline copy stays light


# --- the callbacks' flops_target: fitted at the start, again at the end, kept on resume ----------------
CALLBACKS = {"transkimmer": ("Transkimmer", {}, 1, "keep_threshold"), "mue": ("MuE", {}, 64, "image_threshold")}


def _fit(tmp_path, name, steps, calls, ckpt=None, save=None):
    """A ``flops_target=0.7`` run of ``name``'s callback; ``calls`` gets, at each fit, the knob's
    value on the model when fit_budget was called (what the run had set until then)."""
    import tiny_lightning as tl
    from test_flops_target_callbacks import Classifier
    from torch.utils.data import DataLoader, TensorDataset

    import vleff.budget

    cls, settings, batch, knob = CALLBACKS[name]
    real = vleff.budget.fit_budget

    def spy(model, *args, **kwargs):
        calls.append(get_method(name).applied_settings(model)[knob])
        return real(model, *args, **kwargs)

    vleff.budget.fit_budget = spy
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(batch, 3, 64, 64, generator=g), torch.randint(0, 10, (batch,), generator=g))
        callback = getattr(vleff.callbacks, cls)(**settings, flops_target=0.7, budget_batches=1)
        module, loader = Classifier(), DataLoader(data, batch)
        trainer = tl.trainer(tmp_path, [callback], max_steps=steps, max_epochs=-1)
        trainer.fit(module, loader, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
    finally:
        vleff.budget.fit_budget = real
    return module, callback, next(iter(loader))


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_the_callback_refits_at_train_end_and_a_resumed_run_restores_the_knob(name, tmp_path):
    ckpt, knob = str(tmp_path / "half.ckpt"), CALLBACKS[name][3]
    calls: list[float] = []
    module, first, batch = _fit(tmp_path, name, 1, calls, save=ckpt)
    assert len(calls) == 2  # at the start, and again on the trained weights at the end
    applied = get_method(name).applied_settings(module.model)
    assert first.budget_settings is not None and applied[knob] == first.budget_settings[knob]
    assert abs(measure_ratio(module.model, [batch[0]], method=name) - 0.7) <= 0.02 * 0.7
    calls.clear()
    module, resumed, _ = _fit(tmp_path, name, 2, calls, ckpt=ckpt)
    assert calls == [first.budget_settings[knob]]  # no fit at the start: the checkpoint's knob was set
    assert resumed.budget_settings is not None
