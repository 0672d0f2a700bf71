"""MemVP: visual features as memory of a language model's FFNs (Jie et al., ICML 2024).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.memvp.core import (
    MemVPConfig,
    apply_memvp,
    holds_memvp_host,
    memvp_applied,
    memvp_settings,
    remove_memvp,
    set_memvp_memory,
    update_memvp,
)
from vleff.registry import Method, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="MemVP",
        settings_of=memvp_settings,
        holds=holds_memvp_host,
        # the declarative contract: what the method does, what it refuses, what update may change
        updatable=("scale", "dropout"),
        required_on_load=True,
        name="memvp",
        kind="side",
        config=MemVPConfig,
        apply=apply_memvp,
        remove=remove_memvp,
        update=update_memvp,
        is_applied=memvp_applied,
        callback="vleff.methods.memvp.lightning.MemVP",
        mixin="vleff.methods.memvp.lightning.MemVPMixin",
        towers=(),
        bench_settings={"n_mem": 256},
        description="MemVP: visual features as extra key/value rows of every FFN of the language model",
    )
)

__all__ = ["METHOD", "MemVPConfig", "apply_memvp", "memvp_applied", "remove_memvp", "set_memvp_memory", "update_memvp"]
