"""LoHa through Hugging Face ``peft``: the update as a Hadamard product of two rank-r products, on
the attention input projections. :mod:`.core` holds the config and ``apply``/``remove``; the Lightning
callback and mixin live in :mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.loha.core import (
    TOWERS,
    LoHaConfig,
    apply_loha,
    loha_applied,
    loha_parameters,
    loha_settings,
    loha_state_dict,
    loha_targets,
    remove_loha,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="LoHa",
        name="loha",
        kind="side",
        config=LoHaConfig,
        apply=apply_loha,
        remove=remove_loha,
        is_applied=loha_applied,
        settings_of=loha_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.loha.lightning.LoHa",
        mixin="vleff.methods.loha.lightning.LoHaMixin",
        towers=TOWERS,
        bench_settings={"r": 8},
        description="LoHa (Hadamard product of two low-rank products) through Hugging Face peft "
        "on the attention input projections",
    )
)

__all__ = [
    "LoHaConfig",
    "METHOD",
    "apply_loha",
    "loha_applied",
    "loha_parameters",
    "loha_state_dict",
    "loha_targets",
    "remove_loha",
]
