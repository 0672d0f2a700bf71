"""``vleff.fit_budget``: each token method's knob set so the measured FLOPs hit a target.

The ToMe case is checked against an independent count: the FLOPs of a timm ViT worked out from
its shapes and the token counts each block ran on (attention on the tokens entering the block,
the MLP on those left after the merge, ToMe's matching where a block merged), which equals
vleff's counter exactly at a fixed ``r`` (asserted first), so the search's ratio is the model's.
"""

from __future__ import annotations

import math
import warnings

import pytest
import tiny_models as tm
import torch
from timm.models.vision_transformer import VisionTransformer

import vleff
from vleff.backbones import last_token_state, token_counts
from vleff.budget import fit_budget
from vleff.flops import count_flops
from vleff.registry import get_method

D, DEPTH, HEADS, PATCHES = 32, 6, 2, 64


def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64, patch_size=8, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_classes=10
    ).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def analytic_flops(model: VisionTransformer, x: torch.Tensor) -> int:
    """The ViT's FLOPs from its shapes and the token counts of ``model``'s last forward."""
    counts = token_counts(model).get("image", [PATCHES + 1] * DEPTH)
    state = last_token_state(model)
    after = [*counts[1:], state.num_tokens if state is not None else PATCHES + 1]
    f = 2 * PATCHES * (3 * 8 * 8) * D + 2 * D * 10  # patch embedding, head
    for n, kept in zip(counts, after):
        f += 8 * n * D * D + 4 * n * n * D + 16 * kept * D * D  # qkv + proj, attention, MLP
        if kept < n:  # the bipartite matching of the block's keys (head mean), a·bᵀ
            f += 2 * math.ceil(n / 2) * (n // 2) * (D // HEADS)
    return x.shape[0] * f


def test_the_independent_count_equals_the_counter():
    model, x = vit(), images()
    assert count_flops(model, x) == analytic_flops(model, x)
    vleff.apply_tome(model, r=[5, 3, 0, 7])
    assert count_flops(model, x) == analytic_flops(model, x)


@pytest.mark.parametrize("target", [0.8, 0.6, 0.45])
def test_tome_lands_within_two_percent_by_the_independent_count(target):
    model, x = vit(), images()
    plain = analytic_flops(model, x)
    vleff.apply_tome(model, r=0)
    fit = fit_budget(model, [x], flops=target)
    with torch.no_grad():
        model(x)
    ratio = analytic_flops(model, x) / plain
    assert abs(ratio - target) <= 0.02 * target
    assert fit.ratio == pytest.approx(ratio, rel=1e-12)
    assert get_method("tome").applied_settings(model)["r"] == fit.settings["r"]


@pytest.mark.parametrize(
    "name, settings",
    [("turbo", {"r": 0, "r_threshold": 0}), ("evit", {"keep_rate": 1.0}), ("dynamicvit", {"distill": False})],
)
def test_every_image_token_method_lands_within_two_percent(name, settings):
    model, x = vit(), images()
    get_method(name).apply(model, **settings)
    fit = fit_budget(model, [x], flops=0.6)
    assert fit.error <= 0.02 and fit.method == name
    assert vleff.budget.measure_ratio(model, [x]) == pytest.approx(fit.ratio)
    # more knob never costs more: the search relies on it
    ordered = [r for _, r in sorted(fit.evaluations)]
    assert all(b <= a + 1e-12 for a, b in zip(ordered, ordered[1:]))


def test_a_target_beyond_the_knob_is_refused_naming_the_closest_and_changes_nothing():
    model, x = vit(), images()
    vleff.apply_tome(model, r=2)
    with pytest.raises(
        ValueError, match=r"flops=0.05 is out of reach for ToMe.*closest reachable is 0\.\d+x.*most reduction"
    ):
        fit_budget(model, [x], flops=0.05)
    assert get_method("tome").applied_settings(model)["r"] == 2


def test_a_target_between_two_steps_is_refused_or_set_to_the_closest_with_a_warning():
    model, x = tm.timm_vit().eval(), tm.images()  # 17 tokens, 3 blocks: coarse steps
    vleff.apply_tome(model, r=0)
    with pytest.raises(ValueError, match="moves in steps: the nearest settings give"):
        fit_budget(model, [x], flops=0.7)
    with pytest.warns(RuntimeWarning, match="the closest is set"):
        fit = fit_budget(model, [x], flops=0.7, strict=False)
    assert fit.error > 0.02 and fit.ratio == min((r for _, r in fit.evaluations), key=lambda r: abs(r - 0.7))


def test_pair_methods_fit_both_towers_of_a_clip():
    torch.manual_seed(0)
    batch = (tm.images(), tm.token_ids())
    for name, settings in (("crossget", {"r_image": 0, "r_text": 0}), ("madtp", {})):
        model = tm.open_clip_model(vision_layers=4, text_layers=4).eval()
        get_method(name).apply(model, **settings)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # tiny towers: coarse steps
            fit = fit_budget(model, [batch], flops=0.8, strict=False, max_evals=10)
        assert fit.method == name and 0 < fit.ratio < 1
        assert vleff.budget.measure_ratio(model, [batch]) == pytest.approx(fit.ratio)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"flops": 0}, ValueError, "flops=0"),
        ({"flops": 1.5}, ValueError, "flops=1.5"),
        ({"flops": float("nan")}, ValueError, "flops=nan"),
        ({"tolerance": 0}, ValueError, "tolerance=0"),
        ({"batches": torch.zeros(2, 3, 64, 64)}, TypeError, "iterable of batches.*wrap one batch in a list"),
        ({"batches": []}, ValueError, "batches is empty"),
        ({"batches": [{"x": 1}]}, TypeError, "batches must be image tensors.*got dict"),
        ({"method": "lora"}, ValueError, "method='lora' has no FLOPs knob"),
    ],
)
def test_bad_input_gets_a_clear_error(kwargs, error, match):
    model = vit()
    vleff.apply_tome(model, r=0)
    args = {"batches": [images()], **kwargs}
    with pytest.raises(error, match=match):
        fit_budget(model, **args)


def test_no_or_several_token_methods_applied_are_refused_clearly():
    model = vit()
    with pytest.raises(ValueError, match="none of them is applied"):
        fit_budget(model, [images()])
    vleff.apply_tome(model, r=0)
    vleff.apply_evit(model, keep_rate=1.0)
    with pytest.raises(ValueError, match="tome are applied|evit, tome are applied.*method=<name>"):
        fit_budget(model, [images()])
    fit = fit_budget(model, [images()], flops=0.7, method="evit")
    assert fit.method == "evit" and fit.error <= 0.02


def test_a_strict_madtp_failure_puts_back_everything_its_controller_moved():
    """MADTP's controller moves τ, its first pruning block, the chosen-τ flag and the hooks'
    ``flops_reduction``; a strict fit that misses restores all of them, not τ alone."""
    from vleff.backbones import find_pair
    from vleff.methods.madtp.core import HOOK_NAME, MODULE_NAME
    from vleff.tokens.common import hooks_named

    torch.manual_seed(0)
    batch = (tm.images(), tm.token_ids())
    model = tm.open_clip_model(vision_layers=4, text_layers=4).eval()
    vleff.apply_madtp(model)
    module = getattr(find_pair(model).model, MODULE_NAME)

    def state():
        return module.get_extra_state(), [h.config for h in hooks_named(model, HOOK_NAME)]

    before = state()
    with pytest.raises(ValueError, match="out of reach for MADTP|pass strict=False"):
        fit_budget(model, [batch], flops=0.995, max_evals=6)
    assert state() == before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fit_budget(model, [batch], flops=0.995, max_evals=6, strict=False)
    moved, configs = state()
    assert moved["calibrated"] and configs != before[1]  # what the strict failure had to undo besides τ


def test_out_of_reach_names_the_smallest_setting_that_does_the_most_not_the_search_bound():
    """ToMe's knob runs to a bound far past what blocks can merge (r is capped per block): the
    closest setting reported, and kept with strict=False, is the smallest with the same FLOPs."""
    model, x = vit(), images()
    vleff.apply_tome(model, r=0)
    with pytest.warns(RuntimeWarning, match="the closest is set"):
        fit = fit_budget(model, [x], flops=0.05, strict=False)
    r = fit.settings["r"]
    assert max(r) <= PATCHES // 2  # no block can merge more than half its 64 patches
    smaller = [max(v - 1, 0) if i == 0 else v for i, v in enumerate(r)]
    assert vleff.budget.measure_ratio(model, [x]) == pytest.approx(fit.ratio)
    vleff.update(model, "tome", r=smaller)  # one merge less does less: r is the smallest that does the most
    assert vleff.budget.measure_ratio(model, [x]) > fit.ratio
