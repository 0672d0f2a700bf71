"""Lightning callback and mixin: fine-tune an image-text model with MADTP, the user's code unchanged.

``setup`` applies :func:`vleff.methods.madtp.core.apply_madtp` to the module's image-text model
before ``configure_optimizers`` (the codebook and projections reach the optimizer) and before
checkpoint weights load (resume restores them, τ included). The alignment loss is added to the
loss ``training_step`` returns (:mod:`vleff.lightning.aux_loss`).

The FLOPs controller (:class:`vleff.methods.madtp.controller.MADTPController`) keeps the first
``calibration_batches`` training batches, calibrates τ on them when training starts (so the
measured FLOPs hit ``baseline × (1 − flops_reduction)``) and again after every epoch; its state
(τ, baseline, the batches, the history) is in the checkpoint, so a resumed run continues
with the same τ and the same calibration data. Under DDP global rank 0 calibrates on its batches
and every rank gets its controller state (:func:`_calibrate_as_rank_zero`; under sharding every rank runs
rank 0's calibration alongside it, since each forward gathers from all ranks), so all ranks prune
with one τ.

Lightning validates at the end of an epoch *before* ``on_train_epoch_end``, so an epoch's
validation metrics are of the τ that epoch trained with, and the re-calibration after the last
epoch (which keeps the final weights at the FLOPs target) comes after the last validation:
run ``trainer.validate`` once more for figures of the model training leaves.

A stand-alone ``trainer.validate`` / ``test`` / ``predict`` (no ``fit`` in this run) of a model
whose τ was never chosen (no fit, no checkpoint with τ, no :func:`vleff.calibrate_madtp`)
calibrates first, on that stage's first ``calibration_batches`` batches: otherwise it would run
at the starting τ, far from the FLOPs target, without a word.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.lightning.aux_loss import AuxLoss
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import AuxLossMixin, mixin_target, next_hook
from vleff.lightning.strategy import check_strategy, shards_parameters
from vleff.lightning.targets import RemovalOption
from vleff.methods.madtp.controller import ControllerConfig, MADTPController
from vleff.methods.madtp.core import (
    MADTPConfig,
    _find_pair_in,
    _pair_and_module,
    apply_madtp,
)

CHECKPOINT_KEY = "vleff_madtp_controller"


def _target(pl_module: nn.Module, path: str | nn.Module | None, config: MADTPConfig | None = None) -> nn.Module:
    """The image-text model MADTP acts on (:func:`vleff.lightning.targets.resolve_target`:
    ``path`` names it; ``None``: the one pair inside, several refused listing them)."""
    from vleff.lightning.targets import resolve_target

    found = resolve_target(pl_module, path, "madtp", config)
    return _find_pair_in(found).model if path is None else found


def _loader(trainer: pl.Trainer) -> Any:
    loader = trainer.train_dataloader
    if loader is None:
        raise RuntimeError("MADTP calibration needs the training dataloader, which the trainer does not have")
    return loader


def _calibrate_as_rank_zero(
    trainer: pl.Trainer, controller: MADTPController, target: nn.Module, calibrate: Callable[[], Any]
) -> None:
    """Calibrate as global rank 0 would, and give every rank its controller state (τ, first
    pruning block, baseline, history, calibration batches).

    Why: under DDP each rank sees other batches; calibrating on each would leave the ranks
    pruning with different τ (different compute per rank, and a checkpoint holding rank 0's
    τ while the other ranks trained with theirs). Under a strategy that shards the parameters
    every forward gathers each block from all ranks, so rank 0 cannot calibrate alone (it would
    wait on gathers the others never join): every rank takes rank 0's state and batches first
    and runs the same calibration forwards on the same gathered weights, which choose the same τ;
    rank 0's result is then handed to all, as under DDP."""
    if trainer.world_size == 1:
        calibrate()
        return
    if shards_parameters(trainer.strategy):
        start = trainer.strategy.broadcast(controller.state_dict() if trainer.is_global_zero else None, src=0)
        if not trainer.is_global_zero:
            controller.load_state_dict(start)
            controller.restore(target)
        calibrate()
    elif trainer.is_global_zero:
        calibrate()
    state = trainer.strategy.broadcast(controller.state_dict() if trainer.is_global_zero else None, src=0)
    if not trainer.is_global_zero:
        controller.load_state_dict(state)
    controller.restore(target)


# The controller's three moments in a Lightning run, shared by the callback and the mixin.
def controller_train_start(trainer: pl.Trainer, controller: MADTPController, target: nn.Module) -> None:
    """Resume (τ and the batches came with the checkpoint) or capture the first batches and calibrate."""
    if controller.calibrated:
        controller.resume(target)
        return
    controller.capture(_loader(trainer))
    _calibrate_as_rank_zero(trainer, controller, target, lambda: controller.calibrate(target))


def controller_epoch_end(trainer: pl.Trainer, controller: MADTPController, target: nn.Module) -> bool:
    """Re-calibrate after the epoch (when enabled); whether it did."""
    if not controller.config.adjust_every_epoch or controller.batches is None:
        return False
    epoch = trainer.current_epoch
    _calibrate_as_rank_zero(trainer, controller, target, lambda: controller.calibrate(target, epoch=epoch))
    return True


def controller_train_end(trainer: pl.Trainer, controller: MADTPController, target: nn.Module) -> None:
    """A run shorter than the warm-up ends calibrated at the target."""
    _calibrate_as_rank_zero(trainer, controller, target, lambda: controller.finish(target))


class MADTP(InitFromOption, RemovalOption, AuxLoss):
    """MADTP (alignment-guided token pruning, τ kept at a FLOPs target) for an existing LightningModule.

    Args:
        module: the image-text model: dotted attribute path or module object (default: the one
            the module holds; several are refused, listing them).
        log: log ``madtp/tau`` and ``madtp/flops_ratio`` after each epoch's calibration (with
            ``sync_dist=True``: every rank holds rank 0's τ, so the mean is that value, and
            Lightning does not warn about epoch-level logging under DDP).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        remove_on_teardown: restore the plain forward when the run ends.
        **settings: :class:`vleff.methods.madtp.core.MADTPConfig` fields (``flops_reduction``,
            ``num_codes``, ``align_weight``, ``ragged``, ``towers`` ...), validated here, and the
            FLOPs controller's settings (``calibration_batches``, ``adjust_every_epoch``, ``rtol``,
            ``max_evals``, ``epoch_max_evals``, ``measure``, ``samples``, ``warmup_epochs``),
            defaults and rules in :class:`vleff.methods.madtp.controller.ControllerConfig` (their
            one owner).
    """

    settings_config = MADTPConfig
    method = "madtp"
    #: the FLOPs controller's settings, also taken as keywords (split from the method's)
    controller_config = ControllerConfig
    #: the after-epoch re-calibration comes after Lightning's validation of the epoch, so the
    #: model training leaves is not the one last validated (``vleff-train`` validates again)
    changes_model_after_validation = True

    def __init__(
        self,
        module: str | nn.Module | None = None,
        log: bool = True,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(log)
        self.init_initial(init_from)
        self.init_removal(remove_on_teardown)
        controller, settings = ControllerConfig.split(settings)
        self.config = MADTPConfig.build(**settings)
        from vleff.lightning.targets import check_module_arg

        self.module = check_module_arg(module)
        self.controller = MADTPController(controller, self.config.flops_reduction)
        self._target: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "madtp")
        target = _target(pl_module, self.module, self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        # applied with the callback's settings, or refused naming both (tau is the controller's)
        self.apply_or_keep(
            target, self.config, lambda: apply_madtp(target, self.config), driven=("tau", "flops_reduction")
        )
        self._target = target
        self.controller.restore(target)
        super().setup(trainer, pl_module, stage)  # the alignment loss joins the training loss

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the loss wrapper released
        self.remove_at_teardown(self._target)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._target is not None
        controller_train_start(trainer, self.controller, self._target)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_for_evaluation(trainer, "validate")

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_for_evaluation(trainer, "test")

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calibrate_for_evaluation(trainer, "predict")

    def _calibrate_for_evaluation(self, trainer: pl.Trainer, stage: str) -> None:
        """Calibrate τ on the stage's first batches when no calibration exists (see the module
        docstring). The training controller is left untouched (a later ``fit`` calibrates on its
        training batches); rank 0 calibrates and every rank gets its τ."""
        from lightning.pytorch.trainer.states import TrainerFn
        from lightning.pytorch.utilities import rank_zero_info

        if self._target is None or trainer.state.fn == TrainerFn.FITTING or self.controller.calibrated:
            return
        if _pair_and_module(self._target)[1].calibrated:
            return
        loader = {
            "validate": trainer.val_dataloaders,
            "test": trainer.test_dataloaders,
            "predict": trainer.predict_dataloaders,
        }[stage]
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        probe = MADTPController(
            self.controller.config.replace(adjust_every_epoch=False, warmup_epochs=0), self.config.flops_reduction
        )
        try:
            if loader is None:
                raise ValueError("the trainer has no dataloader for it")
            probe.capture(loader)
        except (TypeError, ValueError) as err:
            raise RuntimeError(
                f"MADTP: trainer.{stage} runs a model whose τ was never calibrated (no fit, no checkpoint with τ), "
                f"and its {stage} batches cannot calibrate it ({err}); call vleff.calibrate_madtp(model, batches) "
                "first, or load a checkpoint trained with the MADTP callback"
            ) from err
        rank_zero_info(
            f"MADTP: τ was never calibrated; calibrating for flops_reduction="
            f"{self.config.flops_reduction} on the first {len(probe.batches or [])} {stage} batches"
        )
        _calibrate_as_rank_zero(trainer, probe, self._target, lambda: probe.calibrate(self._target, final=True))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._target is None or not controller_epoch_end(trainer, self.controller, self._target):
            return
        if self.log:
            last = self.controller.history[-1]
            pl_module.log_dict(
                {"madtp/tau": float(last["tau"]), "madtp/flops_ratio": float(last["ratio"])},
                on_step=False,
                on_epoch=True,
                batch_size=1,
                sync_dist=True,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._target is not None:
            controller_train_end(trainer, self.controller, self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "madtp", self.config)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()  # its "target" is the callback's flops_reduction

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict)  # refuses another flops_reduction or ramp
        if self._target is not None:
            self.controller.restore(self._target)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class MADTPMixin(AuxLossMixin):
    """``use_madtp(**settings)`` in ``__init__`` and ``loss + self.vleff_aux_loss()`` in
    ``training_step``; τ is calibrated when training starts and after each epoch, and the
    controller's state travels in the checkpoint under ``"vleff_madtp_controller"``."""

    _vleff_madtp: MADTPController | None = None
    #: see :attr:`vleff.callbacks.MADTP.changes_model_after_validation`
    changes_model_after_validation = True

    def use_madtp(self, module: Any = None, **settings: Any) -> None:
        """``settings``: :class:`vleff.methods.madtp.core.MADTPConfig` fields and the controller's
        (:class:`vleff.methods.madtp.controller.ControllerConfig`), as the callback takes them."""
        controller_config, settings = ControllerConfig.split(settings)
        config = MADTPConfig.build(**settings)
        controller = MADTPController(controller_config, config.flops_reduction)
        target = mixin_target(self, module, "madtp", config)
        apply_madtp(target, config)
        self._vleff_madtp = controller
        self.__dict__["_vleff_madtp_target"] = target  # not a child: the model is already one

    def _madtp_target(self) -> Any:
        return self.__dict__.get("_vleff_madtp_target", self)

    def on_train_start(self) -> Any:
        out = next_hook(self, MADTPMixin, "on_train_start")
        if self._vleff_madtp is not None:
            controller_train_start(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_train_epoch_end(self) -> Any:
        out = next_hook(self, MADTPMixin, "on_train_epoch_end")
        if self._vleff_madtp is not None:
            controller_epoch_end(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_train_end(self) -> Any:
        out = next_hook(self, MADTPMixin, "on_train_end")
        if self._vleff_madtp is not None:
            controller_train_end(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, MADTPMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_madtp is not None:
            checkpoint[CHECKPOINT_KEY] = self._vleff_madtp.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, MADTPMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_madtp is not None and CHECKPOINT_KEY in checkpoint:
            self._vleff_madtp.load_state_dict(checkpoint[CHECKPOINT_KEY])
            self._vleff_madtp.restore(self._madtp_target())
