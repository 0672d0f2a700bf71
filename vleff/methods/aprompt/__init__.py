"""APrompt: learned key/value prompts inside every block's attention, on top of input prompts
(:mod:`.core`; E2VPT's released code followed where APrompt's could not be read). The Lightning
callback and mixin live in :mod:`.lightning`; importing this package registers the method."""

from __future__ import annotations

from vleff.methods.aprompt.core import (
    TOWERS,
    APromptConfig,
    apply_aprompt,
    aprompt_applied,
    aprompt_num_parameters,
    aprompt_parameters,
    remove_aprompt,
)
from vleff.registry import Method, Refusal, register_method
from vleff.side.common import FREEZES_PEFT_TUNERS

METHOD = register_method(
    Method(
        display_name="APrompt",
        name="aprompt",
        kind="side",
        config=APromptConfig,
        apply=apply_aprompt,
        remove=remove_aprompt,
        is_applied=aprompt_applied,
        # keys/values in front of the attention, not tokens (the tower_hook trait brings the shared refusals)
        traits=frozenset({"tower_hook"}),
        # the prompts freeze the backbone, a peft tuner's adapters in it included; a peft tuner
        # applied after them would freeze the prompts: refused both ways, naming both
        refuses=(Refusal("peft_tuner", FREEZES_PEFT_TUNERS),),
        required_on_load=True,
        callback="vleff.methods.aprompt.lightning.APrompt",
        mixin="vleff.methods.aprompt.lightning.APromptMixin",
        towers=TOWERS,
        bench_settings={"kv_tokens": 10, "num_tokens": 10},
        description="APrompt: learned key/value prompts in every attention plus VPT-deep input prompts (E2VPT-style)",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "APromptConfig",
    "aprompt_applied",
    "aprompt_num_parameters",
    "aprompt_parameters",
    "apply_aprompt",
    "remove_aprompt",
]
