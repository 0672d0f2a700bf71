"""Reversible blocks (RevNet / Rev-ViT / MEFT couplings): activations constant in depth.

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.reversible.core import (
    TOWERS,
    ReversibleConfig,
    apply_reversible,
    remove_reversible,
    reversible_applied,
    reversible_settings,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        unsharded=(
            "its stack runs the blocks' sublayers itself and recomputes them in backward, outside the "
            "blocks' calls where FSDP gathers their weights"
        ),
        display_name="Reversible",
        settings_of=reversible_settings,
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"runs_blocks"}),
        refuses=(Refusal("tower_hook", "the reversible stack runs F and G itself, not the tower hooks"),),
        required_on_load=True,
        name="reversible",
        kind="memory",
        config=ReversibleConfig,
        apply=apply_reversible,
        remove=remove_reversible,
        is_applied=reversible_applied,
        callback="vleff.methods.reversible.lightning.Reversible",
        mixin="vleff.methods.reversible.lightning.ReversibleMixin",
        towers=TOWERS,
        bench_settings={"coupling": "meft"},
        description="reversible blocks (RevNet/MEFT couplings): activations constant in depth",
    )
)

__all__ = ["METHOD", "ReversibleConfig", "TOWERS", "apply_reversible", "remove_reversible", "reversible_applied"]
