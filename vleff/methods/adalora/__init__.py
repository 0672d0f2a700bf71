"""AdaLoRA through Hugging Face ``peft`` (Zhang et al., ICLR 2023): SVD-form LoRA whose rank budget
falls during training (the callback steps the allocator). :mod:`.core` holds the config and
``apply``/``remove``; the Lightning callback and mixin live in :mod:`.lightning`.
Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.adalora.core import (
    TOWERS,
    AdaLoRAConfig,
    adalora_applied,
    adalora_parameters,
    adalora_settings,
    adalora_state_dict,
    adalora_targets,
    allocator,
    apply_adalora,
    orthogonal_regulariser,
    rank_pattern,
    ranks,
    remove_adalora,
    update_and_allocate,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        unsharded=("its orthogonality loss reads every P and Q outside the blocks' forward, where they are shards"),
        display_name="AdaLoRA",
        name="adalora",
        kind="side",
        config=AdaLoRAConfig,
        apply=apply_adalora,
        remove=remove_adalora,
        is_applied=adalora_applied,
        settings_of=adalora_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.adalora.lightning.AdaLoRA",
        mixin="vleff.methods.adalora.lightning.AdaLoRAMixin",
        towers=TOWERS,
        bench_settings={"init_r": 12, "target_r": 8, "total_step": 1000},
        description="AdaLoRA (SVD-form LoRA with a falling rank budget) through Hugging Face peft "
        "on the attention input projections",
    )
)

__all__ = [
    "AdaLoRAConfig",
    "METHOD",
    "apply_adalora",
    "adalora_applied",
    "adalora_parameters",
    "adalora_state_dict",
    "adalora_targets",
    "allocator",
    "orthogonal_regulariser",
    "rank_pattern",
    "ranks",
    "remove_adalora",
    "update_and_allocate",
]
