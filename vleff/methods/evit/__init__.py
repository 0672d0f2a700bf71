"""EViT: keep the tokens the class token attends to, fuse the rest (Liang et al., ICLR 2022).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.evit.core import (
    TOWERS,
    EViTConfig,
    apply_evit,
    evit_applied,
    remove_evit,
    update_evit,
)
from vleff.registry import Budget, Method, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="EViT",
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reduces_tokens"}),
        updatable=("keep_rate", "fuse"),
        schedule="keep_rate",
        name="evit",
        kind="tokens",
        config=EViTConfig,
        apply=apply_evit,
        remove=remove_evit,
        update=update_evit,
        is_applied=evit_applied,
        callback="vleff.methods.evit.lightning.EViT",
        mixin="vleff.methods.evit.lightning.EViTMixin",
        towers=TOWERS,
        bench_settings={"keep_rate": 0.7},
        description="EViT: keep the tokens the cls token attends to, fuse the rest",
        # keep rate 1 (knob 0) down to 1 % of the tokens (knob 1)
        budget=Budget("keep_rate", lambda model, knob: {"keep_rate": 1.0 - 0.99 * float(knob)}),
    )
)

__all__ = ["EViTConfig", "METHOD", "TOWERS", "apply_evit", "evit_applied", "remove_evit", "update_evit"]
