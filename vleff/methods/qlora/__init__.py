"""QLoRA (Dettmers et al., NeurIPS 2023): a frozen 4-bit NF4 base (``torchao``'s ``NF4Tensor``, double
quantised scales) with ``peft`` LoRA on every linear layer of the blocks. :mod:`.core` holds the
config and ``apply``/``remove``, :mod:`.nf4` the 4-bit layer; the Lightning callback and mixin live in
:mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.qlora.core import (
    TOWERS,
    QLoRAConfig,
    apply_qlora,
    qlora_applied,
    qlora_parameters,
    qlora_quantization_error,
    qlora_settings,
    qlora_state_dict,
    qlora_targets,
    qlora_weight_bytes,
    remove_qlora,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="QLoRA",
        name="qlora",
        kind="side",
        config=QLoRAConfig,
        apply=apply_qlora,
        remove=remove_qlora,
        is_applied=qlora_applied,
        settings_of=qlora_settings,
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "wraps_projections",
                "both wrap the same projections in peft adapters, which remove could not tell apart",
            ),
        ),
        required_on_load=True,
        callback="vleff.methods.qlora.lightning.QLoRA",
        mixin="vleff.methods.qlora.lightning.QLoRAMixin",
        towers=TOWERS,
        bench_settings={"r": 8},
        description="QLoRA: 4-bit NF4 frozen base (torchao) with peft LoRA on every linear layer of the blocks",
    )
)

__all__ = [
    "METHOD",
    "QLoRAConfig",
    "apply_qlora",
    "qlora_applied",
    "qlora_parameters",
    "qlora_quantization_error",
    "qlora_settings",
    "qlora_state_dict",
    "qlora_targets",
    "qlora_weight_bytes",
    "remove_qlora",
]
