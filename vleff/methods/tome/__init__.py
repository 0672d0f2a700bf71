"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from functools import partial

from vleff.methods.tome.core import (
    TOWERS,
    ToMeConfig,
    apply_tome,
    remove_tome,
    tome_applied,
    update_tome,
)
from vleff.registry import Budget, Method, register_method
from vleff.tokens.merging import budget_levels, budget_settings

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="ToMe",
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reduces_tokens"}),
        updatable=("r", "prop_attn", "trace_source"),
        schedule="r",
        name="tome",
        kind="tokens",
        config=ToMeConfig,
        apply=apply_tome,
        remove=remove_tome,
        update=update_tome,
        is_applied=tome_applied,
        callback="vleff.methods.tome.lightning.TokenMerging",
        mixin="vleff.methods.tome.lightning.TokenMergingMixin",
        towers=TOWERS,
        bench_settings={"r": 16},
        description="ToMe token merging (bipartite soft matching)",
        budget=Budget("r", partial(budget_settings, hook_name="tome"), partial(budget_levels, hook_name="tome")),
    )
)

__all__ = ["METHOD", "TOWERS", "ToMeConfig", "apply_tome", "remove_tome", "tome_applied", "update_tome"]
