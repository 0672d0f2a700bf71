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

from vleff._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "apply_tome": "vleff.tokens.tome",
    "remove_tome": "vleff.tokens.tome",
    "apply_dynamicvit": "vleff.tokens.dynamicvit",
    "remove_dynamicvit": "vleff.tokens.dynamicvit",
    "apply_evit": "vleff.tokens.evit",
    "remove_evit": "vleff.tokens.evit",
    "apply_crossget": "vleff.tokens.crossget",
    "remove_crossget": "vleff.tokens.crossget",
    "apply_madtp": "vleff.tokens.madtp",
    "remove_madtp": "vleff.tokens.madtp",
    "calibrate_madtp": "vleff.tokens.madtp",
    "apply_vqt": "vleff.side.vqt",
    "remove_vqt": "vleff.side.vqt",
    "apply_lst": "vleff.side.lst",
    "remove_lst": "vleff.side.lst",
    "apply_unipt": "vleff.side.unipt",
    "remove_unipt": "vleff.side.unipt",
    "apply_lora": "vleff.side.lora",
    "remove_lora": "vleff.side.lora",
    "side_state_dict": "vleff.side.common",
    "load_side_state_dict": "vleff.side.common",
    "apply_reversible": "vleff.memory.reversible",
    "remove_reversible": "vleff.memory.reversible",
    "apply_memvp": "vleff.side.memvp",
    "remove_memvp": "vleff.side.memvp",
    "update": "vleff.registry",
    "get_method": "vleff.registry",
    "available_methods": "vleff.registry",
    "vleff_aux_loss": "vleff.tokens.aux",
    "find_towers": "vleff.backbones",
    "find_tower": "vleff.backbones",
    "last_token_state": "vleff.backbones",
    "token_counts": "vleff.backbones",
}


__getattr__ = lazy_getattr("vleff", _LAZY, ("backbones", "callbacks", "data", "kernels", "memory", "models",
                                             "profile", "side", "tokens"))


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
