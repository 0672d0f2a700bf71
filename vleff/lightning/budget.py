"""The ``flops_target=`` option of the token-method callbacks, written once.

At the start of ``fit`` the callback measures its first ``budget_batches`` training batches and
sets its method's knob with :func:`vleff.fit_budget` so the FLOPs of the model it acts on are
``flops_target`` × the model without the method (within 2 %) — or, with ``budget_tower="image"``
/ ``"text"``, the FLOPs of that tower of an image-text model alone (the budget of a method that
reduces one tower: the other tower's unchanged cost would dilute a whole-model ratio); the callback then runs its own
schedule towards those settings (ToMe's warm-up ends at the fitted ``r``, EViT's cosine at the
fitted keep rate). Under DDP global rank 0's settings go to every rank (each rank sees other
batches). The fitted settings are in the callback's checkpoint state, so a resumed run continues
with them instead of measuring again. A knob whose FLOPs follow the weights (Transkimmer's keep
threshold, MuE's exit threshold: :attr:`vleff.registry.Budget.data_dependent`) is fitted again
when training ends (:meth:`refit_budget_at_train_end`), on the trained weights.

Use: :meth:`init_budget` in ``__init__`` (the callback's ``flops_target``, ``budget_batches`` and
``budget_tower`` arguments); :meth:`fit_budget_at_train_start` in
``on_train_start`` with the model the method acts on, :meth:`refit_budget_at_train_end` in
``on_train_end``; :meth:`budget_state` /
:meth:`load_budget_state` in ``state_dict`` / ``load_state_dict``; override
:meth:`take_budget` where the callback drives a setting by a schedule.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.checks import check_int, check_number


class BudgetOption:
    """``flops_target`` and ``budget_batches`` of a token-method callback (see the module docstring).
    The class attribute ``method`` names the registry entry."""

    method: str = ""

    def init_budget(self, flops_target: float | None, budget_batches: int, budget_tower: str | None = None) -> None:
        self.flops_target = (
            None if flops_target is None else check_number("flops_target", flops_target, low=0, high=1, low_open=True)
        )
        self.budget_batches = check_int("budget_batches", budget_batches, low=1)
        #: ``None``: the target is of the whole model; ``"image"`` / ``"text"``: of that tower of an
        #: image-text model alone (:func:`vleff.budget.tower_forward`), e.g. when only it is reduced
        self.budget_tower = budget_tower
        if budget_tower is not None:
            from vleff.budget import tower_forward

            tower_forward(budget_tower, "budget_tower")  # checks the name now, not at train start
        #: the settings the budget search set (restored from a checkpoint on resume)
        self.budget_settings: dict[str, Any] | None = None

    def fit_budget_at_train_start(self, trainer: pl.Trainer, target: nn.Module, strict: bool = True) -> None:
        """Measure and set the knob once per run (a restored run reuses its settings)."""
        if self.flops_target is None:
            return
        from vleff.registry import update

        if self.budget_settings is None:
            settings = None
            if trainer.is_global_zero:
                from vleff.budget import fit_budget

                loader = trainer.train_dataloader
                if loader is None:
                    raise RuntimeError(f"flops_target={self.flops_target} needs the training dataloader to measure on")
                batches = list(itertools.islice(iter(loader), self.budget_batches))
                settings = fit_budget(
                    target,
                    batches,
                    flops=self.flops_target,
                    method=self.method,
                    strict=strict,
                    forward=self._budget_forward(),
                ).settings
            self.budget_settings = trainer.strategy.broadcast(settings, src=0)
        assert self.budget_settings is not None
        update(target, self.method, **self.budget_settings)
        self.take_budget(self.budget_settings)

    def _budget_forward(self) -> Any:
        """What the budget counts: the tower ``budget_tower`` names, or the whole model (``None``)."""
        if self.budget_tower is None:
            return None
        from vleff.budget import tower_forward

        return tower_forward(self.budget_tower, "budget_tower")

    def refit_budget_at_train_end(self, trainer: pl.Trainer, target: nn.Module) -> None:
        """A knob whose FLOPs follow the weights (:attr:`vleff.registry.Budget.data_dependent`: a
        threshold on learned scores) is fitted again on the same batches once training has moved
        them, so the trained model meets the target; out of reach, the closest is set with a
        warning (training is done; an error would lose it). Other knobs keep their settings."""
        from vleff.registry import get_method

        budget = get_method(self.method).budget
        if self.flops_target is None or budget is None or not budget.data_dependent:
            return
        self.budget_settings = None
        self.fit_budget_at_train_start(trainer, target, strict=False)

    def take_budget(self, settings: dict[str, Any]) -> None:
        """The fitted settings become the callback's own (default: its ``config``)."""
        self.config = self.config.replace(**settings)  # type: ignore[attr-defined]

    def budget_state(self) -> dict[str, Any]:
        return {
            "flops_target": self.flops_target,
            "budget_tower": self.budget_tower,
            "budget_settings": self.budget_settings,
        }

    def load_budget_state(self, state: dict[str, Any]) -> None:
        same = state.get("flops_target") == self.flops_target and state.get("budget_tower") == self.budget_tower
        if same and state.get("budget_settings") is not None:
            self.budget_settings = dict(state["budget_settings"])  # a checkpoint of this budget
            self.take_budget(self.budget_settings)
