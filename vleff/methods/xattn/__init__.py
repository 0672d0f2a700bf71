"""Xattn (Gheini et al., EMNLP 2021): only the cross-attention (and the task head) trains, on the
text models that read the image by cross-attention (BLIP). :mod:`.core` holds the config and
``apply``/``remove``; the Lightning callback and mixin live in :mod:`.lightning`. Importing this
package registers the method."""

from __future__ import annotations

from vleff.methods.xattn.core import (
    TEXT_MODELS,
    TOWERS,
    XattnConfig,
    apply_xattn,
    cross_attention_names,
    cross_attention_towers,
    remove_xattn,
    xattn_applied,
    xattn_parameters,
    xattn_settings,
    xattn_state_dict,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="Xattn",
        name="xattn",
        kind="side",
        config=XattnConfig,
        apply=apply_xattn,
        remove=remove_xattn,
        is_applied=xattn_applied,
        settings_of=xattn_settings,
        traits=frozenset({"selects_parameters"}),
        refuses=(Refusal("selects_parameters", "both choose which backbone parameters train"),),
        callback="vleff.methods.xattn.lightning.Xattn",
        mixin="vleff.methods.xattn.lightning.XattnMixin",
        towers=TOWERS,
        bench_settings={},
        description="Xattn: only the cross-attention (and the head) of BLIP's text models trains",
    )
)

__all__ = [
    "METHOD",
    "TEXT_MODELS",
    "TOWERS",
    "XattnConfig",
    "apply_xattn",
    "cross_attention_names",
    "cross_attention_towers",
    "remove_xattn",
    "xattn_applied",
    "xattn_parameters",
    "xattn_settings",
    "xattn_state_dict",
]
