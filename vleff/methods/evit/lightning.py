"""Lightning callback: train or fine-tune with EViT token reorganisation.

``setup`` applies :func:`vleff.methods.evit.core.apply_evit` to every image tower of the
LightningModule. The keep rate follows :class:`vleff.methods.evit.core.EViTSchedule`: 1 until
``start_epoch``, then a cosine (updated every training batch) down to ``keep_rate`` at
``end_epoch`` (default: the trainer's ``max_epochs``). Validation during ``fit`` uses the rate
of the latest training step; when ``fit`` ends the model is set to the target rate (even if
training stopped before the schedule finished), and ``validate``/``test``/``predict`` run at
the target. The schedule's position is in the callback's checkpoint state, so a resumed run
continues the schedule.

``init_from=<checkpoint>`` loads trained weights in ``setup`` (fine-tuning a model whose
module starts from random weights; see :mod:`vleff.lightning.init_weights`).

Which model and an already applied EViT follow the rules of every method callback
(:mod:`vleff.lightning.targets`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.checks import check_bool, check_ratio
from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import fitting, mixin_target, next_hook
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.evit.core import (
    EViTConfig,
    EViTSchedule,
    apply_evit,
    evit_applied,
    training_progress,
    update_evit,
)


class EViT(InitFromOption, RemovalOption, BudgetOption, Callback):
    """EViT (keep the tokens the cls token attends to, fuse the rest) for an existing LightningModule.

    Args:
        start_epoch: keep everything until this epoch (the paper warms up this way).
        end_epoch: epoch at which the cosine reaches ``keep_rate`` (default: the trainer's
            ``max_epochs``, or where ``max_steps`` ends when training is limited by steps).
        log: log the current keep rate as ``evit/keep_rate``.
        init_from: a Lightning checkpoint or ``state_dict`` file loaded into the module at the
            start of the first ``fit`` (fine-tune a trained model; not a resume).
        module: the model to apply EViT to: attribute path or module object (default: the one
            model of the LightningModule with a tower ``towers`` names; several are refused).
        remove_on_teardown: restore the plain forward when the run ends (a later run with this
            callback applies EViT again).
        flops_target: set the method's knob at the start of ``fit`` so the measured FLOPs are this
            fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches; kept in checkpoints).
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.evit.core.EViTConfig` fields (``keep_rate`` -- the target
            of the schedule --, ``locations``, ``fuse``, ``towers``), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    settings_config = EViTConfig
    method = "evit"

    def __init__(
        self,
        start_epoch: float = 0.0,
        end_epoch: float | None = None,
        log: bool = True,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self.config = EViTConfig.build(**settings)
        self.module = check_module_arg(module)
        self.target = self.config.keep_rate
        self.locations = self.config.locations
        self.fuse = self.config.fuse
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.log = check_bool("log", log)
        self.init_initial(init_from)
        EViTSchedule(self.target, start_epoch, end_epoch)  # validate now
        self.schedule: EViTSchedule | None = None
        self.current: float | None = None  # set in setup (or restored from a checkpoint)
        self._module: Any = None  # the model EViT is applied to
        self._fitting = False
        self._end_from_max_steps = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = resolve_target(pl_module, self.module, "evit", self.config)
        self.load_initial_once(pl_module, target, stage)
        end = self.end_epoch
        self._end_from_max_steps = False
        if end is None:
            if trainer.max_epochs is not None and trainer.max_epochs > 0:
                end = trainer.max_epochs
            elif stage == "fit" and trainer.max_steps is not None and trainer.max_steps > 0:
                end = self.start_epoch  # placed at the first batch, once the batches per epoch are known
                self._end_from_max_steps = True
            elif stage == "fit":
                raise ValueError(
                    "EViT(end_epoch=None) ends its keep-rate cosine at the trainer's max_epochs or "
                    "max_steps, but neither is set; pass end_epoch=<epoch>"
                )
            else:
                end = self.start_epoch
        self.schedule = EViTSchedule(self.target, self.start_epoch, end)
        self._fitting = stage == "fit"
        if self._fitting:  # fit runs the schedule (continuing from a restored or earlier rate)
            if self.current is None:
                self.current = self.schedule(0.0)
            rate = self.current
        else:  # validate/test/predict: the trained model runs at the target
            rate = self.target
        self.note_removal(target)
        self.apply_or_keep(
            target, self.config, lambda: apply_evit(target, self.config.replace(keep_rate=rate)), driven=("keep_rate",)
        )  # the schedule's
        self._module = target
        update_evit(target, keep_rate=rate)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self.schedule is not None
        batches = trainer.num_training_batches
        if self._end_from_max_steps and isinstance(batches, int) and batches > 0:
            # max_steps counts optimizer steps; an epoch has batches / accumulate_grad_batches of them
            end = trainer.max_steps * trainer.accumulate_grad_batches / batches
            self.schedule = EViTSchedule(self.target, self.start_epoch, max(end, self.start_epoch))
            self._end_from_max_steps = False
        progress = training_progress(
            trainer.global_step, trainer.accumulate_grad_batches, batches, trainer.current_epoch
        )
        self.set_keep_rate(self._module if self._module is not None else pl_module, self.schedule(progress))
        if self.log:
            pl_module.log("evit/keep_rate", self.current, on_step=True, on_epoch=False, batch_size=1)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        # the target keep rate: what the model leaves fit at, and what a restored model runs
        record_method(checkpoint, pl_module, self._module, "evit", self.config.replace(keep_rate=self.target))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the model leaves fit at the target rate (also when it stopped before the schedule
        # ended); ``current`` keeps the schedule's position for checkpoints
        update_evit(self._module if self._module is not None else pl_module, keep_rate=self.target)

    def set_keep_rate(self, pl_module: Any, keep_rate: float) -> None:
        """Set the keep rate of the model EViT is applied to (``pl_module``)."""
        self.current = check_ratio("keep_rate", keep_rate)
        update_evit(pl_module, keep_rate=keep_rate)

    # --- checkpoint state ----------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._module if self._module is not None else pl_module)

    def take_budget(self, settings: dict[str, Any]) -> None:
        """The fitted keep rate is where the cosine ends."""
        self.config = self.config.replace(**settings)
        self.target = self.config.keep_rate
        if self.schedule is not None:
            self.schedule = EViTSchedule(self.target, self.schedule.start_epoch, self.schedule.end_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "keep_rate": self.current,
            "target": self.target,
            "start_epoch": self.start_epoch,
            "end_epoch": self.end_epoch,
            "locations": self.locations,
            "fuse": self.fuse,
            "budget": self.budget_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = float(state_dict["keep_rate"])
        self.load_budget_state(state_dict.get("budget", {}))
        if self._fitting and self._module is not None and evit_applied(self._module):
            update_evit(self._module, keep_rate=self.current)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
EVIT_KEY = "vleff_evit_keep_rate"


class EViTMixin:
    """``use_evit(..., start_epoch=, end_epoch=)`` in ``__init__``; the keep-rate schedule
    advances every training batch and its current value is saved in the checkpoint. After
    ``fit``, and when loaded with ``load_from_checkpoint``, the model runs at the target."""

    _vleff_evit_schedule: EViTSchedule | None = None
    _vleff_evit_keep_rate: float = 1.0

    def use_evit(
        self, start_epoch: float = 0.0, end_epoch: float | None = None, module: Any = None, **settings: Any
    ) -> None:
        """``end_epoch=None`` jumps to ``keep_rate`` at ``start_epoch`` (give the trainer's
        ``max_epochs`` for the paper's cosine)."""
        config = EViTConfig.build(**settings)
        schedule = EViTSchedule(config.keep_rate, start_epoch, end_epoch)
        apply_evit(mixin_target(self, module, "evit", config), config)  # a model built for use runs at the target
        self._vleff_evit_schedule = schedule
        self._vleff_evit_keep_rate = schedule.target

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = next_hook(self, EViTMixin, "on_train_batch_start", batch, batch_idx)
        schedule = self._vleff_evit_schedule
        trainer = getattr(self, "_trainer", None)
        if schedule is not None and trainer is not None:
            batches = trainer.num_training_batches
            self._vleff_evit_keep_rate = schedule(
                training_progress(trainer.global_step, trainer.accumulate_grad_batches, batches, trainer.current_epoch)
            )
            update_evit(self, keep_rate=self._vleff_evit_keep_rate)  # type: ignore[arg-type]
        return out

    def on_train_end(self) -> Any:
        out = next_hook(self, EViTMixin, "on_train_end")
        if self._vleff_evit_schedule is not None:  # leave fit as the cheap model, at the target
            update_evit(self, keep_rate=self._vleff_evit_schedule.target)  # type: ignore[arg-type]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, EViTMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None:
            checkpoint[EVIT_KEY] = self._vleff_evit_keep_rate

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, EViTMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None and EVIT_KEY in checkpoint:
            self._vleff_evit_keep_rate = float(checkpoint[EVIT_KEY])
            # resuming fit continues the schedule; a model loaded for use runs at the target
            rate = self._vleff_evit_keep_rate if fitting(self) else self._vleff_evit_schedule.target
            update_evit(self, keep_rate=rate)  # type: ignore[arg-type]
