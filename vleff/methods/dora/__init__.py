"""DoRA through Hugging Face ``peft`` (Liu et al., ICML 2024): weight-decomposed LoRA on the
attention input projections. :mod:`.core` holds the config and ``apply``/``remove``; the Lightning
callback and mixin live in :mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.dora.core import (
    TOWERS,
    DoRAConfig,
    apply_dora,
    dora_applied,
    dora_parameters,
    dora_settings,
    dora_state_dict,
    dora_targets,
    remove_dora,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="DoRA",
        name="dora",
        kind="side",
        config=DoRAConfig,
        apply=apply_dora,
        remove=remove_dora,
        is_applied=dora_applied,
        settings_of=dora_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.dora.lightning.DoRA",
        mixin="vleff.methods.dora.lightning.DoRAMixin",
        towers=TOWERS,
        bench_settings={"r": 8},
        description="DoRA (weight-decomposed LoRA) through Hugging Face peft on the attention input projections",
    )
)

__all__ = [
    "DoRAConfig",
    "METHOD",
    "apply_dora",
    "dora_applied",
    "dora_parameters",
    "dora_state_dict",
    "dora_targets",
    "remove_dora",
]
