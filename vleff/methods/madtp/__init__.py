"""MADTP: multimodal alignment-guided dynamic token pruning (Cao et al., CVPR 2024).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.madtp.core import (
    TOWERS,
    MADTPConfig,
    apply_madtp,
    budget_snapshot,
    calibrate_madtp,
    calibrate_madtp_for_bench,
    fit_flops,
    madtp_applied,
    madtp_settings,
    remove_madtp,
    update_madtp,
)
from vleff.registry import Budget, Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        display_name="MADTP",
        settings_of=madtp_settings,
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reduces_tokens", "owns_tokens"}),
        refuses=(Refusal("reduces_tokens", "each rewrites the token sequence its own way"),),
        updatable=("tau", "flops_reduction", "align_weight", "min_keep", "ragged", "code_norm"),
        required_on_load=True,
        name="madtp",
        kind="tokens",
        config=MADTPConfig,
        apply=apply_madtp,
        remove=remove_madtp,
        update=update_madtp,
        is_applied=madtp_applied,
        callback="vleff.methods.madtp.lightning.MADTP",
        mixin="vleff.methods.madtp.lightning.MADTPMixin",
        towers=TOWERS,
        bench_settings={"flops_reduction": 0.5},
        needs_pair=True,
        calibrate=calibrate_madtp_for_bench,
        description="MADTP: prune by a cross-modal codebook, τ calibrated to a FLOPs target",
        budget=Budget("tau", fit=fit_flops, snapshot=budget_snapshot),
    )
)

__all__ = [
    "MADTPConfig",
    "METHOD",
    "TOWERS",
    "apply_madtp",
    "calibrate_madtp",
    "calibrate_madtp_for_bench",
    "madtp_applied",
    "remove_madtp",
    "update_madtp",
]
