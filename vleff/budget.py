"""A FLOPs budget for every token method: :func:`fit_budget` sets the method's own knob so that the
FLOPs *measured* on a few batches hit a target fraction of the model without the method.

Each method declares its knob in its registry entry (:class:`vleff.registry.Budget`): ToMe and
Turbo spread a number of merges over the blocks (front-loaded, one merge at a time: fine steps),
EViT and DynamicViT move their keep rate, CrossGET its per-block merges of both towers, MADTP
hands the target to its own τ controller; Transkimmer's keep threshold and MuE's exit threshold are
knobs whose effective steps depend on the data (:attr:`~vleff.registry.Budget.steps`: the scores
the batches produce), so they are searched over the steps found on those batches. The search
measures with :mod:`vleff.flops` (eval mode, no gradients) and bisects the knob, since more knob
never costs more FLOPs (for Transkimmer to first order: a skimmed token moves the margins of the
tokens after it; each step taken is measured); it stops within
``tolerance`` of the target. A target no setting reaches, or one that falls between two steps of
a discrete knob by more than the tolerance, raises ``ValueError`` naming the closest reachable
ratio and why, and leaves the method as it was (``strict=False`` sets the closest and warns).

>>> vleff.apply_tome(model)
>>> fit = vleff.fit_budget(model, [images], flops=0.5)   # r set so the FLOPs are 0.5x ± 2 %
>>> fit.ratio, fit.settings
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vleff.checks import check_choice, check_int, check_number
from vleff.flops import count_flops
from vleff.registry import Budget, Method, all_methods, get_method, update

Forward = Callable[[nn.Module, Any], Any]
__all__ = ["BudgetFit", "fit_budget", "measure_ratio", "run_batches", "thresholds_between", "tower_forward"]

#: the towers a budget may be of alone (:func:`tower_forward`)
BUDGET_TOWERS = ("image", "text")


@dataclass
class BudgetFit:
    """What :func:`fit_budget` set.

    Attributes:
        method: the registry name of the method whose knob was set.
        settings: the settings it set (what ``vleff.update`` got; checkpoints record them).
        ratio: measured FLOPs over the baseline, at ``settings``.
        target: the requested ratio.
        flops: measured FLOPs at ``settings`` (summed over the batches).
        baseline: measured FLOPs of the model without the method (same batches).
        evaluations: every ``(knob, ratio)`` tried, in order.
    """

    method: str
    settings: dict[str, Any]
    ratio: float
    target: float
    flops: int
    baseline: int
    evaluations: list[tuple[float, float]] = field(default_factory=list)

    @property
    def error(self) -> float:
        """Relative distance to the target, ``|ratio − target| / target``."""
        return abs(self.ratio - self.target) / self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "settings": self.settings,
            "ratio": self.ratio,
            "target": self.target,
            "flops": self.flops,
            "baseline": self.baseline,
            "evaluations": [list(e) for e in self.evaluations],
        }


# --- inputs ------------------------------------------------------------------------------------------
def _to_model(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return t.to(device=param.device, dtype=param.dtype if t.is_floating_point() else None)


def _image_text(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """``(images, ids, mask)`` of an image-text batch whose ids are ``[B, L]``, or ``None``."""
    from vleff.backbones.pairs import image_text_parts

    parts = image_text_parts(batch)
    if parts is None or parts[1].dim() != 2:
        return None
    images, ids, mask = parts
    return images, ids, mask if isinstance(mask, torch.Tensor) else None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """What :func:`fit_budget` counts when no ``forward`` is given: an image-text model (one that
    holds a CLIP/BLIP pair) encodes both towers of an ``(images, token_ids[, mask])`` batch (or a
    dict with ``images``/``pixel_values`` and ``tokens``/``input_ids``); any other model runs
    ``model(images)`` on a tensor batch or on the first element of an ``(images, labels)`` batch."""
    from vleff.backbones.pairs import find_pair

    param = next(model.parameters())
    try:
        pair = find_pair(model)
    except (TypeError, ValueError):
        pair = None
    if pair is not None:
        parts = _image_text(batch)
        if parts is None:
            raise TypeError(
                f"batches for {type(model).__name__} (an image-text model) must be (images, token_ids"
                f"[, attention_mask]) or a dict with 'images'/'pixel_values' and 'tokens'/'input_ids'; got "
                f"{_describe(batch)}; or pass forward=<fn(model, batch)>"
            )
        images, ids, mask = parts
        pair.encode_image(_to_model(images, param))
        return pair.encode_text(ids.to(param.device), mask.to(param.device) if mask is not None else None)
    if isinstance(batch, torch.Tensor):
        return model(_to_model(batch, param))
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(_to_model(batch[0], param))
    raise TypeError(
        f"batches must be image tensors or (images, labels) tuples for {type(model).__name__}; got "
        f"{_describe(batch)}; or pass forward=<fn(model, batch)>"
    )


def tower_forward(tower: str, name: str = "tower") -> Forward:
    """A ``forward(model, batch)`` that runs one tower of an image-text model on an
    ``(images, token_ids[, mask])`` batch (as :func:`default_forward` reads it): ``"image"``
    encodes the images, ``"text"`` the token ids. A budget counted this way is of that tower
    alone: the other tower's FLOPs would dilute the ratio (a CLIP whose image tower is at 0.6×
    and whose text tower is untouched measures well above 0.6× as a whole), which is wrong when
    only one tower is reduced and the budget is stated for it.

    ``model`` is the pair itself or a module holding exactly one (a LightningModule: what a
    callback's budget runs on). ``name`` is the parameter the error messages name (a callback's
    ``budget_tower``).

    Raises:
        ValueError: ``tower`` is not ``"image"`` or ``"text"``.
        TypeError (when run): the model holds no image-text pair (a one-tower model's budget is
            of the whole model: leave the tower unset), or the batch has no images / token ids.
    """
    check_choice(name, tower, BUDGET_TOWERS)

    def forward(model: nn.Module, batch: Any) -> Any:
        from vleff.backbones.pairs import pairs_in

        pairs = [pair for _, pair in pairs_in(model)]  # the model itself, or the pairs a module holds
        if len(pairs) != 1:
            what = "no image-text pair" if not pairs else f"{len(pairs)} image-text pairs"
            raise TypeError(
                f"{name}={tower!r} counts one tower of an image-text model (CLIP, BLIP); "
                f"{type(model).__name__} holds {what}: "
                + (f"leave {name} unset to count the whole model" if not pairs else "pass the one to fit")
            )
        pair = pairs[0]
        parts = _image_text(batch)
        if parts is None:
            raise TypeError(
                f"{name}={tower!r} needs (images, token_ids[, attention_mask]) batches or dicts with "
                f"'images'/'pixel_values' and 'tokens'/'input_ids'; got {_describe(batch)}"
            )
        images, ids, mask = parts
        param = next(model.parameters())
        if tower == "image":
            return pair.encode_image(_to_model(images, param))
        return pair.encode_text(ids.to(param.device), mask.to(param.device) if mask is not None else None)

    forward.__qualname__ = f"tower_forward({tower!r})"
    return forward


def _describe(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of ({', '.join(type(b).__name__ for b in batch)})"
    return type(batch).__name__


def measure(model: nn.Module, batches: list[Any], forward: Forward) -> int:
    """FLOPs of ``forward(model, batch)`` summed over ``batches`` (eval mode, no gradients; the
    model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        return int(sum(count_flops(lambda b=b: forward(model, b)) for b in batches))
    finally:
        model.train(was)


def baseline_flops(model: nn.Module, method: Method, batches: list[Any], forward: Forward) -> int:
    """FLOPs of the model without ``method`` (a copy with the method removed)."""
    plain = copy.deepcopy(model)
    assert method.remove is not None
    method.remove(plain)
    return measure(plain, batches, forward)


def measure_ratio(
    model: nn.Module, batches: Iterable[Any], method: str | None = None, forward: Forward | None = None
) -> float:
    """Measured FLOPs of ``model`` over those of the model without its token method."""
    entry = _budget_method(model, method)
    batches = _check_batches(batches)
    fwd = forward or default_forward
    return measure(model, batches, fwd) / baseline_flops(model, entry, batches, fwd)


# --- the method ---------------------------------------------------------------------------------------
def _budget_method(model: nn.Module, name: str | None) -> Method:
    if name is not None:
        entry = get_method(name)
        if entry.budget is None:
            with_budget = ", ".join(m.name for m in all_methods() if m.budget is not None)
            raise ValueError(f"method={name!r} has no FLOPs knob; fit_budget drives {with_budget}")
        if entry.is_applied is None or not entry.is_applied(model):
            raise ValueError(f"method={name!r} is not applied to this {type(model).__name__}; apply it first")
        return entry
    applied = [m for m in all_methods() if m.budget is not None and m.is_applied is not None and m.is_applied(model)]
    if len(applied) != 1:
        with_budget = ", ".join(m.name for m in all_methods() if m.budget is not None)
        what = "none of them is" if not applied else f"{', '.join(m.name for m in applied)} are"
        raise ValueError(
            f"fit_budget sets the knob of one applied token method ({with_budget}); {what} applied to this "
            f"{type(model).__name__}" + ("; pass method=<name>" if applied else "")
        )
    return applied[0]


def _check_batches(batches: Iterable[Any]) -> list[Any]:
    if isinstance(batches, (torch.Tensor, dict)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of batches (a list of image tensors, of (images, labels) or of "
            f"(images, token_ids) tuples, or a DataLoader); got {type(batches).__name__}: wrap one batch in a list"
        )
    out = list(batches)
    if not out:
        raise ValueError("batches is empty; give at least one batch to measure the FLOPs on")
    return out


# --- the search ---------------------------------------------------------------------------------------
def fit_budget(
    model: nn.Module,
    batches: Iterable[Any],
    flops: float = 0.5,
    *,
    method: str | None = None,
    forward: Forward | None = None,
    tower: str | None = None,
    tolerance: float = 0.02,
    max_evals: int = 30,
    strict: bool = True,
    baseline: int | None = None,
) -> BudgetFit:
    """Set the applied token method's knob so that the measured FLOPs of ``model`` on ``batches``
    are ``flops`` × those of the model without the method, within ``tolerance`` (relative).

    Args:
        model: a model with one token method applied (or name it with ``method=``).
        batches: a few batches as the model runs them (see :func:`default_forward`); their batch
            size matters for methods whose cost is the batch's largest keep count.
        flops: the target ratio, in (0, 1].
        forward: ``forward(model, batch)`` to count instead (a custom head ...).
        tower: ``"image"`` or ``"text"``: count that tower of an image-text model alone
            (:func:`tower_forward`); the target is then of that tower's FLOPs. Not with ``forward``.
        tolerance: ``|ratio − flops| / flops`` accepted (default 2 %).
        max_evals: counted forwards at most.
        strict: a target out of reach raises ``ValueError`` (the method left as it was); with
            ``False`` the closest reachable setting is set and a ``RuntimeWarning`` says so.
        baseline: the FLOPs of the model without the method on these batches, when known (else
            counted on a copy with the method removed).

    Returns:
        :class:`BudgetFit` (the settings set, the measured ratio, every evaluation).
    """
    target = check_number("flops", flops, low=0, high=1, low_open=True)
    tolerance = check_number("tolerance", tolerance, low=0, low_open=True)
    max_evals = check_int("max_evals", max_evals, low=2)
    if tower is not None and forward is not None:
        raise ValueError(f"tower={tower!r} and forward= both say what to count; give one of them")
    fwd = forward or (tower_forward(tower) if tower is not None else default_forward)
    entry = _budget_method(model, method)
    batches = _check_batches(batches)
    budget = entry.budget
    assert budget is not None
    baseline = (
        baseline_flops(model, entry, batches, fwd) if baseline is None else check_int("baseline", baseline, low=1)
    )
    applied = entry.applied_settings(model)
    if budget.fit is not None:  # the method's own controller (MADTP's τ)
        if budget.snapshot is not None:
            restore = budget.snapshot(model)
        else:
            kept = {k: v for k, v in applied.items() if k in entry.updatable}  # the settings are the state
            restore = lambda: update(model, entry.name, **kept)  # noqa: E731
        try:
            settings = budget.fit(model, batches, target, fwd, max_evals)
            value = measure(model, batches, fwd)
        except BaseException:
            restore()
            raise
        fit = BudgetFit(entry.name, settings, value / baseline, target, value, baseline)
        return _finish(fit, tolerance, strict, restore, entry, "its controller's best")
    settings_of, top, discrete = _knob(model, budget, batches, fwd)
    before = {k: v for k, v in applied.items() if k in settings_of(model, 0)}
    ratios = _Search(model, entry, batches, fwd, baseline, settings_of)
    try:
        ratios.bisect(target, tolerance, top, discrete=discrete, max_evals=max_evals)
    except BaseException:
        update(model, entry.name, **before)
        raise
    best = min(ratios.measured, key=lambda k: (abs(ratios.measured[k] / baseline - target), k))
    if discrete and best == top and ratios.measured[best] / baseline > target * (1 + tolerance):
        best = ratios.smallest_equal(best)  # out of reach: name the setting that does the most, not the bound
    settings = settings_of(model, best)
    update(model, entry.name, **settings)
    value = ratios.measured[best]
    fit = BudgetFit(entry.name, settings, value / baseline, target, value, baseline, ratios.evaluations)
    why = _why(ratios.evaluations, target, discrete, budget.setting)
    return _finish(fit, tolerance, strict, lambda: update(model, entry.name, **before), entry, why)


Settings = Callable[[nn.Module, Any], dict[str, Any]]


def _knob(model: nn.Module, budget: Budget, batches: list[Any], forward: Forward) -> tuple[Settings, float, bool]:
    """``(settings(model, knob), top, discrete)``: how the search moves the knob. A data-dependent
    knob's steps (:attr:`Budget.steps`) are found on the batches and indexed like discrete levels."""
    if budget.steps is not None:
        steps = budget.steps(model, batches, forward)
        if not steps:
            raise RuntimeError(f"the budget steps of {budget.setting} came back empty (a method bug)")
        return (lambda _model, knob: dict(steps[int(knob)])), float(len(steps) - 1), True
    assert budget.settings is not None
    top = float(budget.levels(model)) if budget.levels is not None else 1.0
    return budget.settings, top, budget.levels is not None


def run_batches(model: nn.Module, batches: list[Any], forward: Forward) -> None:
    """``forward(model, batch)`` for each batch as :func:`measure` runs it (eval mode, no gradients;
    the model's mode restored), uncounted: what a :attr:`Budget.steps` reads its scores from."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        model.train(was)


def thresholds_between(scores: Iterable[float], low: float, high: float) -> list[float]:
    """Thresholds of a "keep while the score is at most the threshold" rule, from ``high`` (nothing
    passes it; the first step) down to ``low``: one between each two neighbouring distinct
    ``scores`` (their midpoint, clamped to ``[low, high]``), so each step lets the next score pass
    ``score > threshold``. A step's effect does not hinge on recomputing a score to the last bit."""
    distinct = sorted({float(s) for s in scores if math.isfinite(s)}, reverse=True)
    out = [high]
    for a, b in zip(distinct, distinct[1:]):
        out.append(min(max((a + b) / 2, low), high))
    out.append(low)
    return list(dict.fromkeys(out))  # clamping may repeat a value: keep the first


class _Search:
    """Measured ratios of the method at knob values (each counted once)."""

    def __init__(
        self, model: nn.Module, entry: Method, batches: list[Any], forward: Forward, baseline: int, settings: Settings
    ) -> None:
        self.model, self.entry, self.batches, self.forward, self.baseline = model, entry, batches, forward, baseline
        self.settings = settings
        self.measured: dict[float, int] = {}
        self.evaluations: list[tuple[float, float]] = []

    def ratio(self, knob: float) -> float:
        if knob not in self.measured:
            update(self.model, self.entry.name, **self.settings(self.model, knob))
            self.measured[knob] = measure(self.model, self.batches, self.forward)
            self.evaluations.append((knob, self.measured[knob] / self.baseline))
        return self.measured[knob] / self.baseline

    def bisect(self, target: float, tolerance: float, top: float, discrete: bool, max_evals: int) -> None:
        """More knob never costs more: bisect between no reduction (0) and the most (``top``)
        for the crossing of ``target``, stopping within a quarter of ``tolerance`` of it (the
        closest setting measured is kept); a target beyond either end leaves that end measured
        as the closest."""
        lo, hi = 0.0, top
        if self.ratio(hi) > target or self.ratio(lo) <= target:
            return
        while len(self.evaluations) < max_evals:
            if discrete and hi - lo <= 1:
                return
            if not discrete and hi - lo < 1e-6:
                return
            mid = float(math.floor((lo + hi) / 2)) if discrete else (lo + hi) / 2
            value = self.ratio(mid)
            if abs(value - target) <= tolerance * target / 4:  # well inside: more evaluations buy little
                return
            lo, hi = (mid, hi) if value > target else (lo, mid)

    def smallest_equal(self, knob: float) -> float:
        """The smallest discrete knob whose FLOPs equal ``knob``'s (more knob never costs more, so
        they form a range up to ``knob``): a knob past what the model can do (ToMe's ``r`` capped
        per block) is reported and set as the setting that does the same, not as the bound."""
        lo, hi = 0.0, knob
        while hi - lo > 1:
            mid = float(math.floor((lo + hi) / 2))
            lo, hi = (lo, mid) if self.ratio(mid) == self.ratio(knob) else (mid, hi)
        return hi if self.ratio(lo) != self.ratio(knob) else lo


def _why(evaluations: list[tuple[float, float]], target: float, discrete: bool, setting: str) -> str:
    ratios = [r for _, r in evaluations]
    if target < min(ratios):
        return f"the most reduction {setting} allows on this model gives {min(ratios):.3f}x"
    if target > max(ratios):
        return f"even no reduction gives {max(ratios):.3f}x (the method's own cost)"
    below = max((r for r in ratios if r <= target), default=None)
    above = min((r for r in ratios if r > target), default=None)
    if discrete and below is not None and above is not None:
        return f"{setting} moves in steps: the nearest settings give {above:.3f}x and {below:.3f}x"
    return "the search ran out of evaluations (raise max_evals)"


def _finish(
    fit: BudgetFit, tolerance: float, strict: bool, restore: Callable[[], None], entry: Method, why: str
) -> BudgetFit:
    if fit.error <= tolerance:
        return fit
    message = (
        f"flops={fit.target} is out of reach for {entry.display_name} within tolerance={tolerance}: the closest "
        f"reachable is {fit.ratio:.3f}x ({', '.join(f'{k}={v!r}' for k, v in fit.settings.items())}); {why}"
    )
    if strict:
        restore()
        raise ValueError(message + "; pass strict=False to keep the closest, or another flops target")
    warnings.warn(message + "; the closest is set", RuntimeWarning, stacklevel=3)
    return fit
