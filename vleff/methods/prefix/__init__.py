"""Prefix-tuning / P-tuning v2: learned keys and values in front of every block's self-attention
(:mod:`.core`). The Lightning callback and mixin live in :mod:`.lightning`; importing this package
registers the method."""

from __future__ import annotations

from vleff.methods.prefix.core import (
    TOWERS,
    PrefixConfig,
    apply_prefix,
    prefix_applied,
    prefix_num_parameters,
    prefix_parameters,
    remove_prefix,
)
from vleff.registry import Method, Refusal, register_method
from vleff.side.common import FREEZES_PEFT_TUNERS

METHOD = register_method(
    Method(
        display_name="Prefix-tuning",
        name="prefix",
        kind="side",
        config=PrefixConfig,
        apply=apply_prefix,
        remove=remove_prefix,
        is_applied=prefix_applied,
        # keys/values in front of the attention, not tokens (the tower_hook trait brings the shared refusals)
        traits=frozenset({"tower_hook"}),
        # the prompts freeze the backbone, a peft tuner's adapters in it included; a peft tuner
        # applied after them would freeze the prompts: refused both ways, naming both
        refuses=(Refusal("peft_tuner", FREEZES_PEFT_TUNERS),),
        required_on_load=True,
        callback="vleff.methods.prefix.lightning.PrefixTuning",
        mixin="vleff.methods.prefix.lightning.PrefixMixin",
        towers=TOWERS,
        bench_settings={"num_tokens": 10},
        description="Prefix-tuning / P-tuning v2: learned keys/values in front of every block's self-attention",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "PrefixConfig",
    "apply_prefix",
    "prefix_applied",
    "prefix_num_parameters",
    "prefix_parameters",
    "remove_prefix",
]
