"""Lightning callbacks and mixins: each wraps one vleff method or measurement (thin; the work is done in
the method and profile layers). Imported lazily so ``import vleff.callbacks`` stays cheap."""
from __future__ import annotations

import importlib
from typing import Any

# public callback name -> defining module
_CALLBACKS = {
    "TokenMerging": "vleff.callbacks.token_merging",
    "EfficiencyMonitor": "vleff.callbacks.efficiency",
    "DynamicViT": "vleff.callbacks.dynamicvit",
    "EViT": "vleff.callbacks.evit",
    "CrossGET": "vleff.callbacks.crossget",
    "MADTP": "vleff.callbacks.madtp",
    "AuxLoss": "vleff.callbacks.aux_loss",
    "GaLore": "vleff.callbacks.galore",
    "MeZO": "vleff.callbacks.mezo",
    "VisualQueryTuning": "vleff.callbacks.vqt",
    "LadderSideTuning": "vleff.callbacks.side",
    "UniPT": "vleff.callbacks.side",
    "LoRA": "vleff.callbacks.lora",
    "Reversible": "vleff.callbacks.reversible",
    "MemVP": "vleff.callbacks.memvp",
    "AuxLossMixin": "vleff.callbacks.mixins",
    "TokenMergingMixin": "vleff.callbacks.mixins",
    "EViTMixin": "vleff.callbacks.mixins",
    "CrossGETMixin": "vleff.callbacks.mixins",
    "DynamicViTMixin": "vleff.callbacks.mixins",
    "GaLoreMixin": "vleff.callbacks.mixins",
    "MeZOMixin": "vleff.callbacks.mixins",
    "VQTMixin": "vleff.callbacks.mixins",
    "LSTMixin": "vleff.callbacks.mixins",
    "UniPTMixin": "vleff.callbacks.mixins",
    "ReversibleMixin": "vleff.callbacks.mixins",
    "MemVPMixin": "vleff.callbacks.mixins",
    "LoRAMixin": "vleff.callbacks.mixins",
    "MADTPMixin": "vleff.callbacks.mixins",
    "restore_methods": "vleff.callbacks.restore",
}


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    raise AttributeError(f"module 'vleff.callbacks' has no attribute {name!r}; available: {', '.join(sorted(_CALLBACKS))}")


def __dir__() -> list[str]:
    return sorted(_CALLBACKS)


__all__ = sorted(_CALLBACKS)
