"""Mixins of the token methods (ToMe, EViT, DynamicViT, CrossGET, MADTP).

>>> class Finetuner(CrossGETMixin, L.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.clip = open_clip.create_model("ViT-B-16")
...         self.use_crossget(r_image=16, r_text=6)         # in __init__: offsets exist before
...     def training_step(self, batch, i):                 # weights load / optimizers are built
...         img, txt = self.clip.encode_image(batch[0]), self.clip.encode_text(batch[1])
...         return contrastive(img, txt) + self.vleff_aux_loss()   # + the cross-token JS loss

Every ``use_<method>`` takes ``module=`` (an attribute path or the module object) for a module
holding several models (a frozen teacher beside the student); without it several are refused,
listing them (:mod:`vleff.callbacks.targets`). ``use_dynamicvit`` names its backbone already.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vleff.callbacks.madtp import CHECKPOINT_KEY as MADTP_KEY
from vleff.callbacks.madtp import (
    controller_epoch_end,
    controller_train_end,
    controller_train_start,
)
from vleff.callbacks.mixins.base import AuxLossMixin, _fitting, _parent
from vleff.methods.crossget.core import CrossGETConfig, apply_crossget
from vleff.methods.dynamicvit.core import apply_dynamicvit, dynamicvit_teacher
from vleff.methods.evit.core import (
    EViTConfig,
    EViTSchedule,
    apply_evit,
    training_progress,
    update_evit,
)
from vleff.methods.madtp.core import MADTPConfig, apply_madtp
from vleff.methods.madtp.controller import ControllerConfig, MADTPController
from vleff.tokens.schedule import RSchedule
from vleff.methods.tome.core import ToMeConfig, apply_tome

__all__ = ["CrossGETMixin", "DynamicViTMixin", "EViTMixin", "MADTPMixin", "TokenMergingMixin"]


def _mixin_target(owner: Any, module: Any, method: str, config: Any) -> Any:
    """The model inside the mixin's module that ``use_<method>`` acts on."""
    from vleff.callbacks.targets import check_module_arg, resolve_target

    return resolve_target(owner, check_module_arg(module), method, config)

TOME_KEY = "vleff_tome_schedule"
EVIT_KEY = "vleff_evit_keep_rate"
TEACHER_KEY = "vleff_dynamicvit_teacher"


class TokenMergingMixin:
    """``use_tome(..., schedule=, warmup_steps=)``: ToMe with an r schedule that follows the
    global step in training; outside training (after ``fit``, after ``load_from_checkpoint``)
    the model runs at the full r. The schedule is saved in and restored from checkpoints."""

    _vleff_tome: RSchedule | None = None

    def use_tome(self, schedule: str = "constant", warmup_steps: int = 0, module: Any = None,
                 **settings: Any) -> None:
        config = ToMeConfig.build(**settings)
        target = _mixin_target(self, module, "tome", config)
        self._vleff_tome = RSchedule(r=config.r, schedule=schedule, warmup_steps=warmup_steps)
        apply_tome(target, config)  # the schedule then updates the hooks found in this module: the target's
        self._vleff_tome_at(None)

    def _vleff_tome_at(self, step: int | None) -> None:
        """r for optimizer step ``step`` (``None``: the full r)."""
        assert self._vleff_tome is not None
        # each tower from its own depth (CLIP's image and text towers may differ in depth)
        self._vleff_tome.apply_at(self, self._vleff_tome.warmup_steps if step is None else step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if self._vleff_tome is not None:
            self._vleff_tome_at(self.global_step)  # type: ignore[attr-defined]
        return _parent(self, TokenMergingMixin, "on_train_batch_start", batch, batch_idx)

    def on_train_end(self) -> Any:
        if self._vleff_tome is not None:
            self._vleff_tome_at(None)
        return _parent(self, TokenMergingMixin, "on_train_end")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._vleff_tome is not None:
            checkpoint[TOME_KEY] = self._vleff_tome.state_dict()
        _parent(self, TokenMergingMixin, "on_save_checkpoint", checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if TOME_KEY in checkpoint and self._vleff_tome is not None:
            self._vleff_tome = RSchedule.from_state_dict(checkpoint[TOME_KEY])
            self._vleff_tome_at(int(checkpoint.get("global_step", 0)) if _fitting(self) else None)
        _parent(self, TokenMergingMixin, "on_load_checkpoint", checkpoint)


class EViTMixin:
    """``use_evit(..., start_epoch=, end_epoch=)`` in ``__init__``; the keep-rate schedule
    advances every training batch and its current value is saved in the checkpoint. After
    ``fit``, and when loaded with ``load_from_checkpoint``, the model runs at the target."""

    _vleff_evit_schedule: EViTSchedule | None = None
    _vleff_evit_keep_rate: float = 1.0

    def use_evit(self, start_epoch: float = 0.0, end_epoch: float | None = None, module: Any = None,
                 **settings: Any) -> None:
        """``end_epoch=None`` jumps to ``keep_rate`` at ``start_epoch`` (give the trainer's
        ``max_epochs`` for the paper's cosine)."""
        config = EViTConfig.build(**settings)
        schedule = EViTSchedule(config.keep_rate, start_epoch, end_epoch)
        apply_evit(_mixin_target(self, module, "evit", config), config)  # a model built for use runs at the target
        self._vleff_evit_schedule = schedule
        self._vleff_evit_keep_rate = schedule.target

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = _parent(self, EViTMixin, "on_train_batch_start", batch, batch_idx)
        schedule = self._vleff_evit_schedule
        trainer = getattr(self, "_trainer", None)
        if schedule is not None and trainer is not None:
            batches = trainer.num_training_batches
            self._vleff_evit_keep_rate = schedule(training_progress(
                trainer.global_step, trainer.accumulate_grad_batches, batches, trainer.current_epoch))
            update_evit(self, keep_rate=self._vleff_evit_keep_rate)  # type: ignore[arg-type]
        return out

    def on_train_end(self) -> Any:
        out = _parent(self, EViTMixin, "on_train_end")
        if self._vleff_evit_schedule is not None:  # leave fit as the cheap model, at the target
            update_evit(self, keep_rate=self._vleff_evit_schedule.target)  # type: ignore[arg-type]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, EViTMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None:
            checkpoint[EVIT_KEY] = self._vleff_evit_keep_rate

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, EViTMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None and EVIT_KEY in checkpoint:
            self._vleff_evit_keep_rate = float(checkpoint[EVIT_KEY])
            # resuming fit continues the schedule; a model loaded for use runs at the target
            rate = self._vleff_evit_keep_rate if _fitting(self) else self._vleff_evit_schedule.target
            update_evit(self, keep_rate=rate)  # type: ignore[arg-type]


class DynamicViTMixin(AuxLossMixin):
    """``use_dynamicvit(backbone, **settings)`` + ``vleff_aux_loss()`` in ``training_step``; the
    teacher's weights travel in the checkpoint under ``"vleff_dynamicvit_teacher"`` (not in the
    ``state_dict``)."""

    _vleff_dynamicvit_backbone: nn.Module | None = None

    def use_dynamicvit(self, backbone: nn.Module, **settings: Any) -> None:
        """Apply DynamicViT to ``backbone`` (a child of this module whose forward gives logits)."""
        apply_dynamicvit(backbone, **settings)
        self.__dict__["_vleff_dynamicvit_backbone"] = backbone

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, DynamicViTMixin, "on_save_checkpoint", checkpoint)
        teacher = dynamicvit_teacher(self._vleff_dynamicvit_backbone) if self._vleff_dynamicvit_backbone else None
        if teacher is not None:
            checkpoint[TEACHER_KEY] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, DynamicViTMixin, "on_load_checkpoint", checkpoint)
        teacher = dynamicvit_teacher(self._vleff_dynamicvit_backbone) if self._vleff_dynamicvit_backbone else None
        if teacher is not None and TEACHER_KEY in checkpoint:
            teacher.load_state_dict(checkpoint[TEACHER_KEY])


class CrossGETMixin(AuxLossMixin):
    """``use_crossget(**settings)`` in ``__init__`` + ``self.vleff_aux_loss()`` in the loss.
    Settings: :class:`vleff.methods.crossget.core.CrossGETConfig`. The offsets are parameters of the
    module, so they are saved in and restored from checkpoints with the weights."""

    def use_crossget(self, module: Any = None, **settings: Any) -> None:
        config = CrossGETConfig.build(**settings)
        apply_crossget(_mixin_target(self, module, "crossget", config), config)


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
        target = _mixin_target(self, module, "madtp", config)
        apply_madtp(target, config)
        self._vleff_madtp = controller
        self.__dict__["_vleff_madtp_target"] = target  # not a child: the model is already one

    def _madtp_target(self) -> Any:
        return self.__dict__.get("_vleff_madtp_target", self)

    def on_train_start(self) -> Any:
        out = _parent(self, MADTPMixin, "on_train_start")
        if self._vleff_madtp is not None:
            controller_train_start(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_train_epoch_end(self) -> Any:
        out = _parent(self, MADTPMixin, "on_train_epoch_end")
        if self._vleff_madtp is not None:
            controller_epoch_end(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_train_end(self) -> Any:
        out = _parent(self, MADTPMixin, "on_train_end")
        if self._vleff_madtp is not None:
            controller_train_end(self.trainer, self._vleff_madtp, self._madtp_target())  # type: ignore[attr-defined]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, MADTPMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_madtp is not None:
            checkpoint[MADTP_KEY] = self._vleff_madtp.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, MADTPMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_madtp is not None and MADTP_KEY in checkpoint:
            self._vleff_madtp.load_state_dict(checkpoint[MADTP_KEY])
            self._vleff_madtp.restore(self._madtp_target())
