"""Lightning callback and mixin of Transkimmer: the skim predictors are added in ``setup`` (before
``configure_optimizers``, so they reach the optimizer, and before checkpoint weights load, so
resuming restores them); the skim loss is added to the loss the user's ``training_step`` returns
(:mod:`vleff.lightning.aux_loss`); ``module=`` picks the model when the LightningModule holds
several; ``init_from`` loads trained weights before the surgery; ``remove_on_teardown`` restores
the plain forward when the run ends (the rules of every method callback, :mod:`vleff.lightning.targets`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.aux_loss import AuxLoss
from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import AuxLossMixin, mixin_target
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.transkimmer.core import TranskimmerConfig, apply_transkimmer


class Transkimmer(InitFromOption, RemovalOption, BudgetOption, AuxLoss):
    """Transkimmer (learned token skimming) for an existing LightningModule.

    Args:
        module: the model to skim in: attribute path or module object (default: the one model of
            the LightningModule with an image tower; several are refused, listing them).
        log: log the skim loss as ``train/aux/transkimmer/skim``.
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the predictors are added (fine-tuning, not resuming).
        remove_on_teardown: restore the plain forward when the run ends.
        flops_target: set ``keep_threshold`` so the inference FLOPs are this fraction of the model
            without the method (:func:`vleff.fit_budget` on the first ``budget_batches`` training
            batches at the start of ``fit``, and again when training ends: the trained predictors
            give other margins; kept in checkpoints). The batches are measured as they come, and a
            batch at inference runs as many tokens as its widest sample keeps, so it costs more per
            image than one image does, and a threshold fitted on batches makes each image skim more
            than one fitted on single images. Fit on the batch size you will infer at
            (``vleff.fit_budget`` on single images for a per-image budget).
        budget_batches: how many training batches the budget is measured on.
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.transkimmer.core.TranskimmerConfig` fields
            (``skim_coefficient``, ``init_bias``, ``tau``, ``locations``, ``eval_mode``,
            ``keep_threshold``), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    settings_config = TranskimmerConfig
    method = "transkimmer"

    def __init__(
        self,
        module: ModuleArg = None,
        log: bool = True,
        init_from: str | None = None,
        remove_on_teardown: bool = False,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(log)
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self.config = TranskimmerConfig.build(**settings)
        self.module = check_module_arg(module)
        self.init_initial(init_from)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "transkimmer", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_transkimmer(target, self.config))
        super().setup(trainer, pl_module, stage)  # the skim loss joins the training loss

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the loss wrapper released
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "transkimmer", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.refit_budget_at_train_end(trainer, self._target if self._target is not None else pl_module)

    def state_dict(self) -> dict[str, Any]:
        # the predictors are in the module's state_dict
        return {"config": self.config.as_dict(), "budget": self.budget_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_budget_state(state_dict.get("budget", {}))
        saved = state_dict.get("config", {})
        if "locations" in saved and saved["locations"] != self.config.locations:
            raise ValueError(
                f"checkpoint was trained with Transkimmer locations={saved['locations']!r} but this callback "
                f"has locations={self.config.locations!r}; the predictors would not match"
            )


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class TranskimmerMixin(AuxLossMixin):
    """``use_transkimmer(**settings)`` in ``__init__`` and ``loss + self.vleff_aux_loss()`` in
    ``training_step`` (the skim loss; popped, so a callback's step wrapper never adds it twice)."""

    def use_transkimmer(self, module: Any = None, **settings: Any) -> None:
        config = TranskimmerConfig.build(**settings)
        apply_transkimmer(mixin_target(self, module, "transkimmer", config), config)
