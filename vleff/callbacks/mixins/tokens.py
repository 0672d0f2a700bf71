"""LightningModule mixins: the callbacks' behaviour for users who own the module.

One convention for every method: put the mixin first in the bases and call
``self.use_<method>(...)`` in ``__init__`` once the backbone exists (so
``load_from_checkpoint`` rebuilds any new parameters before the weights load). Call
``super()`` in any Lightning hook you override that a mixin also uses, so both run::

    class Classifier(TokenMergingMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("vit_small_patch16_224", num_classes=10)
            self.use_tome(r=16, schedule="linear", warmup_steps=500)

Mixins and callbacks share one implementation (the configs, schedules and aux-loss code of
the method layer); only where it is triggered differs. Methods with aux losses (DynamicViT,
later CrossGET and MADTP) need one call in ``training_step``: ``loss + self.vleff_aux_loss()``.
GaLore builds the optimizer (``self.galore_optimizer(...)`` in ``configure_optimizers``) and
MeZO replaces the step (``self.use_mezo(...)``): see :mod:`vleff.callbacks.memory_mixins`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vleff.callbacks.memory_mixins import GaLoreMixin, MeZOMixin
from vleff.memory.reversible import ReversibleConfig, apply_reversible
from vleff.tokens.aux import vleff_aux_loss
from vleff.tokens.dynamicvit import apply_dynamicvit, dynamicvit_teacher
from vleff.tokens.evit import EViTConfig, EViTSchedule, apply_evit, training_progress, update_evit
from vleff.tokens.schedule import RSchedule
from vleff.tokens.tome import ToMeConfig, apply_tome, tome_r, update_tome

__all__ = ["AuxLossMixin", "DynamicViTMixin", "EViTMixin", "GaLoreMixin", "MeZOMixin", "ReversibleMixin", "TokenMergingMixin"]

TOME_KEY = "vleff_tome_schedule"
EVIT_KEY = "vleff_evit_keep_rate"
TEACHER_KEY = "vleff_dynamicvit_teacher"


def _parent(obj: object, cls: type, hook: str, *args: Any) -> Any:
    """Call the next ``hook`` in the MRO after ``cls`` if there is one (cooperative mixins)."""
    parent = getattr(super(cls, obj), hook, None)  # type: ignore[arg-type]
    return parent(*args) if parent is not None else None


def _fitting(module: object) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and trainer.state.fn == "fit"


class AuxLossMixin:
    """``self.vleff_aux_loss()``: the pending aux losses of this module's towers, summed
    (popped: counted once, also when a callback's step wrapper runs too)."""

    def vleff_aux_loss(self) -> torch.Tensor:
        return vleff_aux_loss(self)  # type: ignore[arg-type]


class TokenMergingMixin:
    """``use_tome(..., schedule=, warmup_steps=)``: ToMe with an r schedule that follows the
    global step in training; outside training (after ``fit``, after ``load_from_checkpoint``)
    the model runs at the full r. The schedule is saved in and restored from checkpoints."""

    _vleff_tome: RSchedule | None = None

    def use_tome(self, schedule: str = "constant", warmup_steps: int = 0, **settings: Any) -> None:
        config = ToMeConfig.build(**settings)
        self._vleff_tome = RSchedule(r=config.r, schedule=schedule, warmup_steps=warmup_steps)
        apply_tome(self, config)  # type: ignore[arg-type]
        self._vleff_tome_at(None)

    def _vleff_tome_at(self, step: int | None) -> None:
        """r for optimizer step ``step`` (``None``: the full r)."""
        assert self._vleff_tome is not None
        depth = len(tome_r(self))  # type: ignore[arg-type]
        r = self._vleff_tome.r_at(self._vleff_tome.warmup_steps if step is None else step, depth)
        update_tome(self, r=r)  # type: ignore[arg-type]

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

    def use_evit(self, start_epoch: float = 0.0, end_epoch: float | None = None, **settings: Any) -> None:
        """``end_epoch=None`` jumps to ``keep_rate`` at ``start_epoch`` (give the trainer's
        ``max_epochs`` for the paper's cosine)."""
        config = EViTConfig.build(**settings)
        schedule = EViTSchedule(config.keep_rate, start_epoch, end_epoch)
        apply_evit(self, config)  # type: ignore[arg-type]  # a model built for use runs at the target
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


class ReversibleMixin:
    """``use_reversible(**settings)``: run the module's towers as reversible stacks (call it
    in ``__init__`` once the backbone exists, so ``load_from_checkpoint`` rebuilds the same
    network the weights were trained in). Settings: :class:`vleff.memory.reversible.ReversibleConfig`."""

    def use_reversible(self, **settings: Any) -> None:
        apply_reversible(self, ReversibleConfig.build(**settings))  # type: ignore[arg-type]
