"""LightningModule mixins of the side methods (VQT, MemVP), for users who own the module.

Same convention as :mod:`vleff.callbacks.mixins`: mixin first in the bases, ``self.use_vqt(...)``
in ``__init__`` once the backbone exists (so ``load_from_checkpoint`` rebuilds the queries before
the weights load), and ``super()`` in overridden Lightning hooks the mixin uses.
"""
from __future__ import annotations

from typing import Any

from vleff.callbacks.mixins import _parent
from vleff.callbacks.vqt import backbone_eval, refuse_unfrozen_backbone
from vleff.checks import check_bool
from vleff.side.vqt import VQTConfig, apply_vqt, freeze_backbone_for_vqt

__all__ = ["MemVPMixin", "VQTMixin"]


class VQTMixin:
    """``use_vqt(train_head=True, **settings)``: VQT applied, backbone frozen; at fit start an
    unfrozen backbone weight is refused, and the backbone stays in eval mode in training."""

    _vleff_vqt_train_head: bool | None = None

    def use_vqt(self, train_head: bool = True, **settings: Any) -> None:
        config = VQTConfig.build(**settings)
        self._vleff_vqt_train_head = check_bool("train_head", train_head)
        apply_vqt(self, config)  # type: ignore[arg-type]
        freeze_backbone_for_vqt(self, train_head=train_head)  # type: ignore[arg-type]

    def on_train_start(self) -> None:
        if self._vleff_vqt_train_head is not None:
            refuse_unfrozen_backbone(self, self._vleff_vqt_train_head)  # type: ignore[arg-type]
            backbone_eval(self)  # type: ignore[arg-type]
        _parent(self, VQTMixin, "on_train_start")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if self._vleff_vqt_train_head is not None:
            backbone_eval(self)  # type: ignore[arg-type]
        return _parent(self, VQTMixin, "on_train_batch_start", batch, batch_idx)


class MemVPMixin:
    """``use_memvp(freeze_host=True, **settings)`` in ``__init__`` once the host exists: MemVP
    applied to the host inside the module (so ``load_from_checkpoint`` rebuilds its parameters
    before the weights load), every other weight frozen when ``freeze_host``."""

    def use_memvp(self, freeze_host: bool = True, **settings: Any) -> None:
        from vleff.side.memvp import MemVPConfig, apply_memvp, freeze_host_for_memvp

        config = MemVPConfig.build(**settings)
        apply_memvp(self, config)  # type: ignore[arg-type]
        if check_bool("freeze_host", freeze_host):
            freeze_host_for_memvp(self)  # type: ignore[arg-type]
