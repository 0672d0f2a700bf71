"""DynamicViT: learned token pruning with per-stage predictors (Rao et al., NeurIPS 2021).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.dynamicvit.core import (
    TOWERS,
    DynamicViTConfig,
    apply_dynamicvit,
    dynamicvit_applied,
    remove_dynamicvit,
    update_dynamicvit,
)
from vleff.registry import Budget, Method, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="DynamicViT",
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reduces_tokens"}),
        required_on_load=True,
        name="dynamicvit",
        kind="tokens",
        config=DynamicViTConfig,
        apply=apply_dynamicvit,
        remove=remove_dynamicvit,
        update=update_dynamicvit,
        updatable=("rho", "keep_ratios"),
        is_applied=dynamicvit_applied,
        callback="vleff.methods.dynamicvit.lightning.DynamicViT",
        mixin="vleff.methods.dynamicvit.lightning.DynamicViTMixin",
        towers=TOWERS,
        bench_settings={"rho": 0.7, "distill": False},
        description="DynamicViT learned token pruning (predictors + masked attention)",
        # the base keep ratio ρ (stages keep ρ, ρ², ...): 1 (knob 0) down to 0.01 (knob 1)
        budget=Budget("rho", lambda model, knob: {"rho": 1.0 - 0.99 * float(knob), "keep_ratios": None}),
    )
)

__all__ = [
    "DynamicViTConfig",
    "METHOD",
    "TOWERS",
    "apply_dynamicvit",
    "dynamicvit_applied",
    "remove_dynamicvit",
    "update_dynamicvit",
]
