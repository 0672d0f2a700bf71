"""``TokenMerging``: ToMe on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.TokenMerging(r=16)])
>>> trainer.fit(model, datamodule)        # the LightningModule is not edited

ToMe is applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights
are restored) and stays applied after ``fit`` so the trained model is the cheap one; call
``vleff.remove_tome(model)`` to get the plain forward back, and ``vleff.apply_tome`` before
``load_from_checkpoint``-ed models are used (ToMe adds no parameters, so the weights load
either way). The r schedule is saved in checkpoints and continues on resume.

Which model, an already applied ToMe and ``remove_on_teardown`` follow the rules of every
method callback (:mod:`vleff.lightning.targets`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import fitting, mixin_target, next_hook
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.tome.core import ToMeConfig, apply_tome
from vleff.methods.tome.schedule import RSchedule


class TokenMerging(InitFromOption, RemovalOption, BudgetOption, pl.Callback):
    """Apply ToMe to the towers of the LightningModule.

    Args:
        schedule: ``"constant"`` or ``"linear"`` (r grows from 0 over ``warmup_steps``).
        warmup_steps: optimizer steps of the linear warm-up.
        remove_on_teardown: restore the plain forward when the run ends (a later run with this
            callback applies it again).
        module: the model to merge in: attribute path or module object (default: the one
            model of the LightningModule with a tower ``towers`` names; several are refused).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        flops_target: set the method's knob at the start of ``fit`` so the measured FLOPs are this
            fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches; kept in checkpoints).
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.tome.core.ToMeConfig` fields (``r``, ``prop_attn``,
            ``trace_source``, ``towers``), validated here.

    ``fit`` follows the schedule from the trainer's global step; ``validate``/``test``/``predict``
    (after a fit or on a fresh trainer) run at the full r.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    method = "tome"
    settings_config = ToMeConfig

    def __init__(
        self,
        schedule: str = "constant",
        warmup_steps: int = 0,
        remove_on_teardown: bool = False,
        module: ModuleArg = None,
        init_from: str | None = None,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.init_initial(init_from)
        self.config = ToMeConfig.build(**settings)
        self.schedule = RSchedule(r=self.config.r, schedule=schedule, warmup_steps=warmup_steps)
        self._asked_r = self.config.r
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        #: r per block of the first ToMe tower (what ``tome/r_mean`` logs)
        self.current_r: list[int] | None = None
        self.module = check_module_arg(module)
        self._target: Any = None

    @property
    def state_key(self) -> str:
        # the r asked for at construction: a budget-fitted r is state, not identity
        return self._generate_state_key(r=str(self._asked_r))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "tome", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(
            target, self.config, lambda: apply_tome(target, self.config.replace(r=0)), driven=("r",)
        )  # r follows the schedule
        step = trainer.global_step if stage == "fit" else self.schedule.warmup_steps
        self._update(pl_module, step)

    def _update(self, pl_module: pl.LightningModule, step: int) -> None:
        # each tower from its own depth (CLIP's image and text towers may differ in depth)
        target = self._target if self._target is not None else pl_module
        self.current_r = self.schedule.apply_at(target, step)[0]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._update(pl_module, trainer.global_step)
        if self.current_r:
            pl_module.log("tome/r_mean", sum(self.current_r) / len(self.current_r), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._update(pl_module, max(trainer.global_step, self.schedule.warmup_steps))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target if self._target is not None else pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        # config.r: the r the schedule ends at, what validation, test and a restored model run
        record_method(checkpoint, pl_module, self._target, "tome", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def take_budget(self, settings: dict[str, Any]) -> None:
        """The fitted ``r`` is where the schedule ends (a warm-up still starts from 0)."""
        self.config = self.config.replace(**settings)
        self.schedule = RSchedule(
            r=settings["r"], schedule=self.schedule.schedule, warmup_steps=self.schedule.warmup_steps
        )

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "current_r": self.current_r, "budget": self.budget_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule = RSchedule.from_state_dict(state_dict["schedule"])
        self.current_r = None  # re-applied from the restored global step at the next batch
        self.load_budget_state(state_dict.get("budget", {}))


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
TOME_KEY = "vleff_tome_schedule"


class TokenMergingMixin:
    """``use_tome(..., schedule=, warmup_steps=)``: ToMe with an r schedule that follows the
    global step in training; outside training (after ``fit``, after ``load_from_checkpoint``)
    the model runs at the full r. The schedule is saved in and restored from checkpoints."""

    _vleff_tome: RSchedule | None = None

    def use_tome(self, schedule: str = "constant", warmup_steps: int = 0, module: Any = None, **settings: Any) -> None:
        config = ToMeConfig.build(**settings)
        target = mixin_target(self, module, "tome", config)
        self._vleff_tome = RSchedule(r=config.r, schedule=schedule, warmup_steps=warmup_steps)
        apply_tome(target, config)  # the schedule then updates the hooks found in this module: the target's
        self._vleff_tome_at(None)

    def _vleff_tome_at(self, step: int | None) -> None:
        """r for optimizer step ``step`` (``None``: the full r)."""
        assert self._vleff_tome is not None
        # each tower from its own depth (CLIP's image and text towers may differ in depth)
        self._vleff_tome.apply_at(self, self._vleff_tome.warmup_steps if step is None else step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = next_hook(self, TokenMergingMixin, "on_train_batch_start", batch, batch_idx)
        if self._vleff_tome is not None:
            self._vleff_tome_at(self.global_step)  # type: ignore[attr-defined]
        return out

    def on_train_end(self) -> Any:
        out = next_hook(self, TokenMergingMixin, "on_train_end")
        if self._vleff_tome is not None:
            self._vleff_tome_at(None)
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, TokenMergingMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_tome is not None:
            checkpoint[TOME_KEY] = self._vleff_tome.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, TokenMergingMixin, "on_load_checkpoint", checkpoint)
        if TOME_KEY in checkpoint and self._vleff_tome is not None:
            self._vleff_tome = RSchedule.from_state_dict(checkpoint[TOME_KEY])
            self._vleff_tome_at(int(checkpoint.get("global_step", 0)) if fitting(self) else None)
