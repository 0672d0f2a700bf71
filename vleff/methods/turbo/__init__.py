"""Turbo: informativity-driven token merging, ToMe plus the class token's attention (Ju et al., ECCV 2024).

The method's folder: :mod:`.core` holds its config, hook and ``apply``/``remove``; the Lightning
callback and mixin live beside it and the core never imports them. Importing this package
registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from functools import partial

from vleff.methods.turbo.core import TOWERS, TurboConfig, apply_turbo, remove_turbo, turbo_applied, update_turbo
from vleff.registry import Budget, Method, register_method
from vleff.tokens.merging import budget_levels, budget_settings

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="Turbo",
        traits=frozenset({"tower_hook", "reduces_tokens"}),
        updatable=("r", "alpha", "beta", "gamma", "r_threshold", "prop_attn", "trace_source"),
        name="turbo",
        kind="tokens",
        config=TurboConfig,
        apply=apply_turbo,
        remove=remove_turbo,
        update=update_turbo,
        is_applied=turbo_applied,
        callback="vleff.methods.turbo.lightning.Turbo",
        mixin="vleff.methods.turbo.lightning.TurboMixin",
        towers=TOWERS,
        bench_settings={"r": 16, "alpha": 5.0},
        description="Turbo: ToMe's merging, sources ranked by redundancy minus the class token's attention",
        budget=Budget("r", partial(budget_settings, hook_name="turbo"), partial(budget_levels, hook_name="turbo")),
    )
)

__all__ = ["METHOD", "TOWERS", "TurboConfig", "apply_turbo", "remove_turbo", "turbo_applied", "update_turbo"]
