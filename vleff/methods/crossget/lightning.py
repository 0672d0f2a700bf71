"""Lightning callback: fine-tune an image-text model with CrossGET on both towers.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.CrossGET(r_image=16, r_text=6)])
>>> trainer.fit(clip_module, datamodule)       # training_step is not edited

``setup`` applies :func:`vleff.methods.crossget.core.apply_crossget` to the pair inside the
LightningModule (before ``configure_optimizers``, so the cross-token offsets are optimised,
and before a checkpoint's weights are restored, so a resumed run gets its trained offsets
back) and, for ``fit``, wraps ``training_step`` so the cross-token JS alignment loss of each
step is added to the loss (and logged as ``train/aux/crossget_js``). CrossGET stays applied
after ``fit``: the trained model is the cheap one (``vleff.remove_crossget`` undoes it).

Which model and an already applied CrossGET follow the rules of every method callback
(:mod:`vleff.lightning.targets`): a module holding two image-text models (a frozen teacher and
a student) needs ``module=``, and a CrossGET applied with other settings is refused (it was
updated to the callback's settings before; now every callback refuses a mismatch alike).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.aux_loss import AuxLoss
from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import AuxLossMixin, mixin_target
from vleff.lightning.strategy import check_strategy
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.crossget.core import CrossGETConfig, apply_crossget


class CrossGET(InitFromOption, RemovalOption, BudgetOption, AuxLoss):
    """CrossGET for an existing LightningModule holding an open_clip / HF CLIP / BLIP retrieval model.

    Args:
        log: log the alignment loss (``train/aux/crossget_js``).
        module: the image-text model: attribute path or module object (default: the one the
            LightningModule holds; several are refused, listing them).
        remove_on_teardown: take CrossGET out when the run ends, keeping its trained offsets for a
            later run (the flags as they were).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        flops_target: set the method's knob at the start of ``fit`` so the measured FLOPs are this
            fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches; kept in checkpoints).
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.crossget.core.CrossGETConfig` fields (``r_image``, ``r_text``,
            ``prop_attn``, ``loss_weight``), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    settings_config = CrossGETConfig
    method = "crossget"

    def __init__(
        self,
        log: bool = True,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(log)
        self.init_initial(init_from)
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self.config = CrossGETConfig.build(**settings)
        self.module = check_module_arg(module)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "crossget")
        target = self._target = resolve_target(pl_module, self.module, "crossget", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_crossget(target, self.config))
        super().setup(trainer, pl_module, stage)  # the JS loss joins the training loss

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the loss wrapper released
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "crossget", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def state_dict(self) -> dict[str, Any]:
        # the offsets are parameters of the model (its state_dict); the settings are kept for reference
        return {"config": self.config.as_dict(), "budget": self.budget_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_budget_state(state_dict.get("budget", {}))


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class CrossGETMixin(AuxLossMixin):
    """``use_crossget(**settings)`` in ``__init__`` + ``self.vleff_aux_loss()`` in the loss.
    Settings: :class:`vleff.methods.crossget.core.CrossGETConfig`. The offsets are parameters of the
    module, so they are saved in and restored from checkpoints with the weights."""

    def use_crossget(self, module: Any = None, **settings: Any) -> None:
        config = CrossGETConfig.build(**settings)
        apply_crossget(mixin_target(self, module, "crossget", config), config)
