"""vleff: efficiency plugins for vision and vision-language transformers.

Functional API (plain PyTorch)::

    import vleff
    vleff.apply_tome(model, r=16)      # token merging on every supported image tower
    vleff.update(model, "tome", r=8)   # change settings of an applied method
    vleff.remove_tome(model)

Lightning callbacks live in :mod:`vleff.callbacks`; measurement in :mod:`vleff.profile`.
Heavy submodules are imported lazily so ``import vleff`` stays fast.
"""

from __future__ import annotations

from typing import Any

from vleff import _moved
from vleff._lazy import lazy_getattr

_moved.install()

__version__ = "0.1.0"

# public name -> module that defines it (``apply_<method>`` / ``remove_<method>`` come from the registry)
_LAZY = {
    "calibrate_madtp": "vleff.methods.madtp",
    "fit_budget": "vleff.budget",
    "BudgetFit": "vleff.budget",
    "side_state_dict": "vleff.side.common",
    "load_side_state_dict": "vleff.side.common",
    "update": "vleff.registry",
    "apply_peft": "vleff.registry",
    "remove_all": "vleff.registry",
    "remove_peft": "vleff.registry",
    "get_method": "vleff.registry",
    "available_methods": "vleff.registry",
    "vleff_aux_loss": "vleff.tokens.aux",
    "find_towers": "vleff.backbones",
    "find_tower": "vleff.backbones",
    "last_token_state": "vleff.backbones",
    "token_counts": "vleff.backbones",
    "shard_blocks": "vleff.backbones.sharding",
    "block_classes": "vleff.backbones.sharding",
}
_SUBPACKAGES = ("backbones", "callbacks", "data", "kernels", "memory", "methods", "models", "profile", "side", "tokens")
_lazy = lazy_getattr("vleff", _LAZY, _SUBPACKAGES)


def _method_function(name: str) -> Any:
    """``apply_<method>`` / ``remove_<method>`` of a registered method with a model surgery, or ``None``."""
    verb, _, method = name.partition("_")
    if verb not in ("apply", "remove") or not method:
        return None
    from vleff.registry import available_methods, get_method

    if method not in available_methods():
        return None
    return getattr(get_method(method), verb)


def __getattr__(name: str) -> Any:
    function = _method_function(name)
    return function if function is not None else _lazy(name)


def __dir__() -> list[str]:
    from vleff.registry import all_methods

    surgery = [f"{verb}_{m.name}" for m in all_methods() if m.apply is not None for verb in ("apply", "remove")]
    return sorted(list(globals()) + list(_LAZY) + surgery)
