"""CrossGET: cross-guided ensemble of tokens on both towers of CLIP/BLIP (Shi et al., ICML 2024).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.crossget.core import (
    ENSEMBLES,
    LOSS_NAME,
    METRICS,
    OFFSETS,
    PAIRS_SUPPORTED,
    TOWERS,
    CrossGETConfig,
    CrossGETHook,
    alignment_loss,
    apply_crossget,
    budget_levels,
    budget_settings,
    crossget_applied,
    crossget_offsets,
    js_divergence,
    layer_pairs,
    remove_crossget,
    resolve_pair,
    update_crossget,
)
from vleff.registry import Budget, Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="CrossGET",
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reduces_tokens", "owns_tokens"}),
        refuses=(
            Refusal("reduces_tokens", "both reduce that tower's tokens"),
            Refusal(
                "reads_full_stream",
                "it reads every block's output of the tower's full token stream, which "
                "CrossGET changes (it adds a cross token and merges tokens)",
            ),
        ),
        updatable=("r_image", "r_text", "prop_attn", "loss_weight", "trace_source", "metric", "ensemble"),
        required_on_load=True,
        name="crossget",
        kind="tokens",
        config=CrossGETConfig,
        apply=apply_crossget,
        remove=remove_crossget,
        update=update_crossget,
        is_applied=crossget_applied,
        callback="vleff.methods.crossget.lightning.CrossGET",
        mixin="vleff.methods.crossget.lightning.CrossGETMixin",
        towers=TOWERS,
        bench_settings={"r_image": 16, "r_text": 6},
        needs_pair=True,
        description="CrossGET cross-guided token ensembles (both towers of CLIP / BLIP)",
        budget=Budget("r_image/r_text", budget_settings, budget_levels),
    )
)

__all__ = [
    "CrossGETConfig",
    "CrossGETHook",
    "ENSEMBLES",
    "LOSS_NAME",
    "METHOD",
    "METRICS",
    "OFFSETS",
    "PAIRS_SUPPORTED",
    "TOWERS",
    "alignment_loss",
    "apply_crossget",
    "crossget_applied",
    "crossget_offsets",
    "js_divergence",
    "layer_pairs",
    "remove_crossget",
    "resolve_pair",
    "update_crossget",
]
