"""Lightning callbacks and mixins: each wraps one vleff method or measurement (thin; the work is done in
the method and profile layers). Imported lazily so ``import vleff.callbacks`` stays cheap."""
from __future__ import annotations

from vleff._lazy import lazy_getattr

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


__getattr__ = lazy_getattr("vleff.callbacks", _CALLBACKS, list_available=True)


def __dir__() -> list[str]:
    return sorted(_CALLBACKS)


__all__ = sorted(_CALLBACKS)  # noqa: PLE0605 -- a list, built from the table above
