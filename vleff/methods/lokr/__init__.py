"""LoKr through Hugging Face ``peft``: the update as a Kronecker product of a small full factor and a
rank-r product on the
attention input projections. :mod:`.core` holds the config and ``apply``/``remove``; the Lightning
callback and mixin live in :mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.lokr.core import (
    TOWERS,
    LoKrConfig,
    apply_lokr,
    lokr_applied,
    lokr_parameters,
    lokr_settings,
    lokr_state_dict,
    lokr_targets,
    remove_lokr,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="LoKr",
        name="lokr",
        kind="side",
        config=LoKrConfig,
        apply=apply_lokr,
        remove=remove_lokr,
        is_applied=lokr_applied,
        settings_of=lokr_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.lokr.lightning.LoKr",
        mixin="vleff.methods.lokr.lightning.LoKrMixin",
        towers=TOWERS,
        bench_settings={"r": 8},
        description="LoKr (Kronecker product of a small factor and a low-rank product) through Hugging Face peft "
        "on the attention input projections",
    )
)

__all__ = [
    "LoKrConfig",
    "METHOD",
    "apply_lokr",
    "lokr_applied",
    "lokr_parameters",
    "lokr_state_dict",
    "lokr_targets",
    "remove_lokr",
]
