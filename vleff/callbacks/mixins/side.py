"""LightningModule mixins of the side methods (VQT, LST, UniPT, MemVP, LoRA), for users who own the module.

Same convention as every mixin (:mod:`vleff.callbacks.mixins`): mixin first in the bases, ``self.use_vqt(...)``
in ``__init__`` once the backbone exists (so ``load_from_checkpoint`` rebuilds the queries before
the weights load), and ``super()`` in overridden Lightning hooks the mixin uses. ``module=`` picks the
model when the LightningModule holds several (a frozen teacher beside the student): an attribute path
or the module object; without it several are refused, listing them (:mod:`vleff.callbacks.targets`).
"""
from __future__ import annotations

from typing import Any

from vleff.callbacks.mixins.base import _parent
from vleff.checks import check_bool

__all__ = ["LSTMixin", "LoRAMixin", "MemVPMixin", "UniPTMixin", "VQTMixin"]


def _mixin_target(owner: Any, module: Any, method: str, config: Any) -> Any:
    """The model inside the mixin's module that ``use_<method>`` acts on (see the module docstring)."""
    from vleff.callbacks.targets import check_module_arg, resolve_target

    return resolve_target(owner, check_module_arg(module), method, config)


class _SideMixin:
    """Shared by the VQT, LST and UniPT mixins: the method applied and the backbone frozen in
    ``use_*``; at fit start an unfrozen backbone weight is refused; the backbone stays in eval
    mode in training; checkpoints leave out only the frozen backbone unless ``full_checkpoint``."""

    _vleff_side: tuple[str, bool, bool] | None = None  # (method, train_head, full_checkpoint)

    def _use_side(self, method: str, train_head: bool, full_checkpoint: bool, config: Any, apply: bool = True,
                  module: Any = None) -> None:
        from vleff.registry import get_method
        from vleff.side.common import freeze_backbone

        self._vleff_side = (method, check_bool("train_head", train_head), check_bool("full_checkpoint", full_checkpoint))
        target = _mixin_target(self, module, method, config)
        if apply:
            get_method(method).apply(target, config)
        freeze_backbone(target, train_head=train_head)
        if not full_checkpoint:
            self.strict_loading = False  # the backbone keys are not in a side-only checkpoint

    def on_train_start(self) -> None:
        if self._vleff_side is not None:
            from vleff.callbacks.side import LABELS
            from vleff.side.common import backbone_eval, refuse_unfrozen_backbone

            refuse_unfrozen_backbone(self, LABELS[self._vleff_side[0]], self._vleff_side[1])  # type: ignore[arg-type]
            backbone_eval(self)  # type: ignore[arg-type]
        _parent(self, _SideMixin, "on_train_start")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if self._vleff_side is not None:
            from vleff.side.common import backbone_eval

            backbone_eval(self)  # type: ignore[arg-type]
        return _parent(self, _SideMixin, "on_train_batch_start", batch, batch_idx)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._vleff_side is not None and not self._vleff_side[2]:
            from vleff.callbacks.side import side_only_checkpoint

            side_only_checkpoint(self, checkpoint)  # type: ignore[arg-type]
        _parent(self, _SideMixin, "on_save_checkpoint", checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._vleff_side is not None:
            from vleff.callbacks.side import check_side_checkpoint

            check_side_checkpoint(self, checkpoint)  # type: ignore[arg-type]
        _parent(self, _SideMixin, "on_load_checkpoint", checkpoint)


class VQTMixin(_SideMixin):
    """``use_vqt(train_head=True, full_checkpoint=False, **settings)``: VQT
    (:mod:`vleff.methods.vqt.core`) on this module's image towers, backbone frozen; checkpoints leave out
    only the frozen backbone (:func:`vleff.side.side_state_dict`) unless ``full_checkpoint``, as with
    :class:`vleff.callbacks.VisualQueryTuning`."""

    def use_vqt(self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None,
                **settings: Any) -> None:
        from vleff.methods.vqt.core import VQTConfig

        self._use_side("vqt", train_head, full_checkpoint, VQTConfig.build(**settings), module=module)


class LSTMixin(_SideMixin):
    """``use_lst(train_head=True, full_checkpoint=False, fisher=None, **settings)``: LST
    (:mod:`vleff.methods.lst.core`) on this module's towers, backbone frozen."""

    def use_lst(self, train_head: bool = True, full_checkpoint: bool = False, fisher: Any = None,
                module: Any = None, **settings: Any) -> None:
        from vleff.methods.lst.core import LSTConfig, apply_lst

        config = LSTConfig.build(**settings)
        target = _mixin_target(self, module, "lst", config)
        apply_lst(target, config, fisher=fisher)  # errors name init/fisher mismatches
        self._use_side("lst", train_head, full_checkpoint, config, apply=False, module=target)


class UniPTMixin(_SideMixin):
    """``use_unipt(train_head=True, full_checkpoint=False, **settings)``: UniPT
    (:mod:`vleff.methods.unipt.core`) on this module's towers, backbone frozen."""

    def use_unipt(self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None,
                  **settings: Any) -> None:
        from vleff.methods.unipt.core import UniPTConfig

        self._use_side("unipt", train_head, full_checkpoint, UniPTConfig.build(**settings), module=module)
class MemVPMixin:
    """``use_memvp(freeze_host=True, **settings)`` in ``__init__`` once the host exists: MemVP
    applied to the host inside the module (so ``load_from_checkpoint`` rebuilds its parameters
    before the weights load), every other weight frozen when ``freeze_host``."""

    def use_memvp(self, freeze_host: bool = True, module: Any = None, **settings: Any) -> None:
        from vleff.methods.memvp.core import MemVPConfig, apply_memvp, freeze_host_for_memvp

        config = MemVPConfig.build(**settings)
        target = _mixin_target(self, module, "memvp", config)
        apply_memvp(target, config)
        if check_bool("freeze_host", freeze_host):
            freeze_host_for_memvp(target)


class LoRAMixin:
    """``use_lora(**settings)`` in ``__init__`` once the backbone exists: ``peft`` LoRA
    (:mod:`vleff.methods.lora.core`) on this module's attention projections, everything else but the
    adapters (and a timm head with ``train_head``) frozen; ``load_from_checkpoint`` then finds
    the adapters before the weights load, as with :class:`vleff.callbacks.LoRA`."""

    def use_lora(self, module: Any = None, **settings: Any) -> None:
        from vleff.methods.lora.core import LoRAConfig, apply_lora

        config = LoRAConfig.build(**settings)
        apply_lora(_mixin_target(self, module, "lora", config), config)
