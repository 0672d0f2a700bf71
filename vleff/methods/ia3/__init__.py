"""IA³ through Hugging Face ``peft``: learned rescaling vectors on the attention input projections
and the MLP's hidden activation. :mod:`.core` holds the config and ``apply``/``remove``; the
Lightning callback and mixin live in :mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.ia3.core import (
    TOWERS,
    IA3Config,
    apply_ia3,
    ia3_applied,
    ia3_parameters,
    ia3_settings,
    ia3_state_dict,
    ia3_targets,
    remove_ia3,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="IA3",
        name="ia3",
        kind="side",
        config=IA3Config,
        apply=apply_ia3,
        remove=remove_ia3,
        is_applied=ia3_applied,
        settings_of=ia3_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.ia3.lightning.IA3",
        mixin="vleff.methods.ia3.lightning.IA3Mixin",
        towers=TOWERS,
        bench_settings={},
        description="IA3 rescaling vectors through Hugging Face peft on the attention input projections and the MLP",
    )
)

__all__ = [
    "IA3Config",
    "METHOD",
    "apply_ia3",
    "ia3_applied",
    "ia3_parameters",
    "ia3_state_dict",
    "ia3_targets",
    "remove_ia3",
]
