"""LoRA through Hugging Face ``peft``, the baseline that side tuning is compared with (Hu et al., ICLR 2022).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.lora.core import (
    TOWERS,
    LoRAConfig,
    apply_lora,
    library_key,
    lora_applied,
    lora_num_parameters,
    lora_parameters,
    lora_settings,
    lora_state_dict,
    lora_targets,
    remove_lora,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="LoRA",
        settings_of=lora_settings,
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"wraps_projections", "peft_tuner"}),
        refuses=(
            Refusal(
                "tower_hook",
                "vleff's generic block reads in_proj_weight without peft's substitution and would ignore the adapter",
                families=("open_clip",),
            ),
        ),
        required_on_load=True,
        name="lora",
        kind="side",
        config=LoRAConfig,
        apply=apply_lora,
        remove=remove_lora,
        is_applied=lora_applied,
        callback="vleff.methods.lora.lightning.LoRA",
        mixin="vleff.methods.lora.lightning.LoRAMixin",
        towers=TOWERS,
        bench_settings={"r": 8},
        description="LoRA through Hugging Face peft on the attention input projections "
        "(the baseline side tuning is compared with)",
    )
)

__all__ = [
    "LoRAConfig",
    "METHOD",
    "TOWERS",
    "apply_lora",
    "library_key",
    "lora_applied",
    "lora_num_parameters",
    "lora_parameters",
    "lora_state_dict",
    "lora_targets",
    "remove_lora",
]
