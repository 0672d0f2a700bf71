"""Lightning callback and mixin of Turbo: applied in ``setup`` (before ``configure_optimizers`` and
before checkpoint weights load), the same settings kept for every stage, a method already applied
with other settings refused, the method recorded in checkpoints (``restore_methods``); ``module=``
picks the model when the LightningModule holds several (the rules of every method callback,
:mod:`vleff.lightning.targets`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.turbo.core import TurboConfig, apply_turbo


class Turbo(InitFromOption, RemovalOption, BudgetOption, pl.Callback):
    """Turbo (training-free informativity-driven merging) for an existing LightningModule.

    Args:
        module: the model to merge in: attribute path or module object (default: the one model of
            the LightningModule with a tower ``towers`` names; several are refused, listing them).
        remove_on_teardown: restore the plain forward when the run ends (a later run with this
            callback applies Turbo again).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        flops_target: set the method's knob at the start of ``fit`` so the measured FLOPs are this
            fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches; kept in checkpoints).
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.turbo.core.TurboConfig` fields (``r``, ``alpha``,
            ``r_threshold``, ``towers`` ...), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    method = "turbo"
    settings_config = TurboConfig

    def __init__(
        self,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        self.init_initial(init_from)
        self.config = TurboConfig.build(**settings)
        self.module = check_module_arg(module)
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "turbo", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_turbo(target, self.config))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "turbo", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.as_dict(), "budget": self.budget_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_budget_state(state_dict.get("budget", {}))


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class TurboMixin:
    """``use_turbo(**settings)`` in ``__init__`` (the model is built for use: Turbo applies at once
    and stays for training, validation and inference)."""

    def use_turbo(self, module: Any = None, **settings: Any) -> None:
        config = TurboConfig.build(**settings)
        apply_turbo(mixin_target(self, module, "turbo", config), config)
