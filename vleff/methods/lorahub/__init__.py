"""LoRAHub (Huang et al., 2023): gradient-free composition of several trained LoRA modules into one
(nevergrad's NGOpt over the module weights, on a few examples). :mod:`.core` holds the config, the
search and ``apply``/``remove``; the Lightning callback and mixin live in :mod:`.lightning`.
Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.lorahub.core import (
    TOWERS,
    LoRAHubConfig,
    LoRAHubResult,
    apply_lorahub,
    check_modules,
    compose,
    few_shot_loss,
    load_module,
    lorahub_applied,
    lorahub_holds,
    lorahub_result,
    lorahub_settings,
    lorahub_state_dict,
    objective,
    remove_lorahub,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="LoRAHub",
        name="lorahub",
        kind="side",
        config=LoRAHubConfig,
        apply=apply_lorahub,  # returns the LoRAHubResult (weights and the search's record), not the model
        remove=remove_lorahub,
        is_applied=lorahub_applied,
        settings_of=lorahub_settings,
        holds=lorahub_holds,
        # peft LoRA layers on the projections: the adapters and prompts refuse it as any peft tuner
        # (each freezes what the other trains); vleff.apply_peft(model, method="lorahub", modules=...) reaches it
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
            Refusal(
                "tower_hook",
                "vleff's generic block reads in_proj_weight without peft's substitution and would ignore the composite",
                families=("open_clip",),
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.lorahub.lightning.LoRAHub",
        mixin="vleff.methods.lorahub.lightning.LoRAHubMixin",
        towers=TOWERS,
        bench_settings={"budget": 40},
        description="LoRAHub: gradient-free composition of trained LoRA modules (nevergrad NGOpt on a few examples)",
    )
)

__all__ = [
    "METHOD",
    "LoRAHubConfig",
    "LoRAHubResult",
    "apply_lorahub",
    "check_modules",
    "compose",
    "few_shot_loss",
    "load_module",
    "lorahub_applied",
    "lorahub_result",
    "lorahub_settings",
    "lorahub_state_dict",
    "objective",
    "remove_lorahub",
]
