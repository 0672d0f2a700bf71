"""``flops_target=`` on the token-method callbacks: the knob is fitted at the start of ``fit`` on
the first training batches, the callback's schedule ends at the fitted settings, and a resumed
run keeps them without measuring again."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import torch
from test_fit_budget import vit
from torch.utils.data import DataLoader, TensorDataset

import vleff
from vleff.budget import measure_ratio
from vleff.registry import get_method

CASES = {
    "tome": ("TokenMerging", {"r": 0}),
    "turbo": ("Turbo", {"r": 0, "r_threshold": 0}),
    "evit": ("EViT", {"keep_rate": 1.0, "locations": [0], "end_epoch": 0}),
    "dynamicvit": ("DynamicViT", {"locations": [1], "distill": False}),
}


class Classifier(tl.TinyClassifier):
    """The 65-token, 6-block ViT of ``test_fit_budget`` (fine knob steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = vit().train()


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 10, (4,), generator=g)), 4)


def _fit(tmp_path, name, target, steps=2, ckpt=None, save=None):
    torch.manual_seed(0)
    cls, settings = CASES[name]
    callback = getattr(vleff.callbacks, cls)(**settings, flops_target=target, budget_batches=1)
    module, loader = Classifier(), _loader()
    trainer = tl.trainer(tmp_path, [callback], max_steps=steps, max_epochs=-1)
    trainer.fit(module, loader, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module, callback, loader


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_fitted_settings_hold_after_fit_and_land_on_the_target(name, tmp_path):
    module, callback, loader = _fit(tmp_path, name, 0.7)
    assert callback.budget_settings is not None
    target = callback._target if getattr(callback, "_target", None) is not None else callback._module
    applied = get_method(name).applied_settings(target)
    assert all(applied[k] == v for k, v in callback.budget_settings.items())
    batch = next(iter(loader))
    assert abs(measure_ratio(target, [batch], method=name) - 0.7) <= 0.02 * 0.7


def test_a_resumed_run_keeps_the_fitted_settings_without_measuring(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "half.ckpt")
    _, first, _ = _fit(tmp_path, "tome", 0.7, steps=1, save=ckpt)
    import vleff.budget

    def refuse(*args, **kwargs):
        raise AssertionError("measured again on resume")

    monkeypatch.setattr(vleff.budget, "fit_budget", refuse)
    _, resumed, _ = _fit(tmp_path, "tome", 0.7, steps=2, ckpt=ckpt)
    assert resumed.budget_settings == first.budget_settings


@pytest.mark.parametrize("bad, match", [(0, "flops_target=0"), (1.2, "flops_target=1.2"), ("half", "flops_target")])
def test_bad_targets_are_refused_at_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        vleff.callbacks.TokenMerging(r=0, flops_target=bad)
    with pytest.raises(ValueError, match="budget_batches"):
        vleff.callbacks.EViT(keep_rate=0.5, flops_target=0.5, budget_batches=0)
