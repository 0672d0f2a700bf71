"""OFT through Hugging Face ``peft``: the frozen weight turned by a learned block-diagonal orthogonal
matrix on the
attention input projections. :mod:`.core` holds the config and ``apply``/``remove``; the Lightning
callback and mixin live in :mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.oft.core import (
    TOWERS,
    OFTConfig,
    apply_oft,
    oft_applied,
    oft_parameters,
    oft_settings,
    oft_state_dict,
    oft_targets,
    remove_oft,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="OFT",
        name="oft",
        kind="side",
        config=OFTConfig,
        apply=apply_oft,
        remove=remove_oft,
        is_applied=oft_applied,
        settings_of=oft_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.oft.lightning.OFT",
        mixin="vleff.methods.oft.lightning.OFTMixin",
        towers=TOWERS,
        bench_settings={"block_size": 32},
        description="OFT (orthogonal fine-tuning: a learned block-diagonal rotation of the weights) "
        "through Hugging Face peft on the attention input projections",
    )
)

__all__ = [
    "OFTConfig",
    "METHOD",
    "apply_oft",
    "oft_applied",
    "oft_parameters",
    "oft_state_dict",
    "oft_targets",
    "remove_oft",
]
