"""Mixins for users who own their LightningModule and prefer explicit calls to callbacks.

They use the same functions as the callbacks (:func:`vleff.tokens.dynamicvit.apply_dynamicvit`,
:class:`vleff.tokens.evit.EViTSchedule`, :func:`vleff.tokens.aux.pop_aux_losses`), so both paths
train the same thing. Put the mixin *before* ``LightningModule`` in the bases and apply the
method in ``__init__`` (then ``load_from_checkpoint`` rebuilds the predictors before loading)::

    class Classifier(DynamicViTMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("vit_small_patch16_224", num_classes=10)
            self.configure_dynamicvit(self.net, rho=0.7)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y) + self.vleff_aux_loss()

No Lightning import here: the hooks below are plain methods that Lightning calls by name.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from vleff.tokens.aux import AuxLossMixin
from vleff.tokens.dynamicvit import apply_dynamicvit, dynamicvit_teacher
from vleff.tokens.evit import EViTSchedule, apply_evit, set_evit_keep_rate

TEACHER_KEY = "vleff_dynamicvit_teacher"
EVIT_KEY = "vleff_evit_keep_rate"


def _parent(obj: object, cls: type, hook: str, *args: Any) -> Any:
    """Call the next ``hook`` in the MRO after ``cls`` if there is one (cooperative mixins)."""
    parent = getattr(super(cls, obj), hook, None)  # type: ignore[arg-type]
    return parent(*args) if parent is not None else None


class DynamicViTMixin(AuxLossMixin):
    """``configure_dynamicvit(backbone, **kwargs)`` + ``vleff_aux_loss()``; the teacher's weights
    travel in the checkpoint under ``"vleff_dynamicvit_teacher"`` (not in the ``state_dict``)."""

    _vleff_dynamicvit_backbone: nn.Module | None = None

    def configure_dynamicvit(self, backbone: nn.Module, **kwargs: Any) -> None:
        """Apply DynamicViT to ``backbone`` (a child of this module whose forward gives logits)."""
        apply_dynamicvit(backbone, **kwargs)
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


class EViTMixin:
    """``configure_evit(...)`` in ``__init__``; the keep-rate schedule advances every training
    batch and its current value is saved in the checkpoint. After ``fit``, and when loaded with
    ``load_from_checkpoint``, the model runs at the target keep rate."""

    _vleff_evit_schedule: EViTSchedule | None = None
    _vleff_evit_keep_rate: float = 1.0

    def configure_evit(self, keep_rate: float = 0.7, locations: Sequence[int] | None = None, fuse: bool = True,
                       start_epoch: float = 0.0, end_epoch: float | None = None) -> None:
        """Apply EViT to this module's image towers; ``end_epoch=None`` jumps to ``keep_rate``
        at ``start_epoch`` (give the trainer's ``max_epochs`` for the paper's cosine)."""
        schedule = EViTSchedule(keep_rate, start_epoch, end_epoch)
        apply_evit(self, keep_rate=schedule(0.0), locations=locations, fuse=fuse)  # type: ignore[arg-type]
        self._vleff_evit_schedule = schedule
        self._vleff_evit_keep_rate = schedule(0.0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = _parent(self, EViTMixin, "on_train_batch_start", batch, batch_idx)
        schedule = self._vleff_evit_schedule
        trainer = getattr(self, "_trainer", None)
        if schedule is not None and trainer is not None:
            batches = trainer.num_training_batches
            frac = batch_idx / batches if isinstance(batches, int) and batches > 0 else 0.0
            self._vleff_evit_keep_rate = schedule(trainer.current_epoch + frac)
            set_evit_keep_rate(self, self._vleff_evit_keep_rate)  # type: ignore[arg-type]
        return out

    def on_train_end(self) -> Any:
        out = _parent(self, EViTMixin, "on_train_end")
        if self._vleff_evit_schedule is not None:  # leave fit as the cheap model, at the target
            set_evit_keep_rate(self, self._vleff_evit_schedule.target)  # type: ignore[arg-type]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, EViTMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None:
            checkpoint[EVIT_KEY] = self._vleff_evit_keep_rate

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _parent(self, EViTMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_evit_schedule is not None and EVIT_KEY in checkpoint:
            self._vleff_evit_keep_rate = float(checkpoint[EVIT_KEY])
            trainer = getattr(self, "_trainer", None)
            fitting = trainer is not None and trainer.state.fn == "fit"
            # resuming fit continues the schedule; a model loaded for use runs at the target
            rate = self._vleff_evit_keep_rate if fitting else self._vleff_evit_schedule.target
            set_evit_keep_rate(self, rate)  # type: ignore[arg-type]
