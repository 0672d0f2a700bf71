"""What every mixin shares: cooperative Lightning hooks (:func:`_parent`) and ``vleff_aux_loss``."""

from __future__ import annotations

from typing import Any

import torch

from vleff.tokens.aux import vleff_aux_loss

__all__ = ["AuxLossMixin"]


def next_hook(obj: object, cls: type, hook: str, *args: Any) -> Any:
    """Call the next ``hook`` in the MRO after ``cls`` if there is one (cooperative mixins)."""
    parent = getattr(super(cls, obj), hook, None)  # type: ignore[arg-type]
    return parent(*args) if parent is not None else None


def fitting(module: object) -> bool:
    trainer = getattr(module, "_trainer", None)
    return trainer is not None and trainer.state.fn == "fit"


class AuxLossMixin:
    """``self.vleff_aux_loss()``: the pending aux losses of this module's towers, summed
    (popped: counted once, also when a callback's step wrapper runs too)."""

    def vleff_aux_loss(self) -> torch.Tensor:
        return vleff_aux_loss(self)  # type: ignore[arg-type]


def mixin_target(owner: Any, module: Any, method: str, config: Any) -> Any:
    """The model inside the mixin's module that ``use_<method>`` acts on (see the module docstring)."""
    from vleff.lightning.targets import check_module_arg, resolve_target

    return resolve_target(owner, check_module_arg(module), method, config)
