"""VPT-deep (Jia et al., ECCV 2022): learned prompt tokens per block, as keys and values in front of
each block's attention (:mod:`.core`). The Lightning callback and mixin live in :mod:`.lightning`;
importing this package registers the method."""

from __future__ import annotations

from vleff.methods.vpt.core import (
    TOWERS,
    VPTConfig,
    apply_vpt,
    remove_vpt,
    vpt_applied,
    vpt_num_parameters,
    vpt_parameters,
)
from vleff.registry import Method, Refusal, register_method
from vleff.side.common import FREEZES_PEFT_TUNERS

METHOD = register_method(
    Method(
        display_name="VPT",
        name="vpt",
        kind="side",
        config=VPTConfig,
        apply=apply_vpt,
        remove=remove_vpt,
        is_applied=vpt_applied,
        # the prompts are keys/values in front of the attention, not tokens: token methods, early
        # exit and other hooks keep working (the tower_hook trait brings the shared refusals)
        traits=frozenset({"tower_hook"}),
        # the prompts freeze the backbone, a peft tuner's adapters in it included; a peft tuner
        # applied after them would freeze the prompts: refused both ways, naming both
        refuses=(Refusal("peft_tuner", FREEZES_PEFT_TUNERS),),
        required_on_load=True,
        callback="vleff.methods.vpt.lightning.VPT",
        mixin="vleff.methods.vpt.lightning.VPTMixin",
        towers=TOWERS,
        bench_settings={"num_tokens": 10},
        description="VPT-deep: N learned prompt tokens per block (their keys/values in front of the attention)",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "VPTConfig",
    "apply_vpt",
    "remove_vpt",
    "vpt_applied",
    "vpt_num_parameters",
    "vpt_parameters",
]
