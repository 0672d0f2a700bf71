"""FishMask (Sung et al., NeurIPS 2021): a fixed global top-k of the backbone's entries by the
empirical Fisher information trains, nothing else. :mod:`.core` holds the config, ``apply`` /
``remove`` and ``select_fishmask``; the Lightning callback and mixin live in :mod:`.lightning`.
Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.fishmask.core import (
    TOWERS,
    FishMaskConfig,
    apply_fishmask,
    fishmask_applied,
    fishmask_masks,
    fishmask_settings,
    keep_count,
    ranked_names,
    remove_fishmask,
    select_fishmask,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        needs_dtensor=(
            "its sharded masks are cut from whole masks by where each rank's shard lies, which a DTensor "
            "says and a flattened shard does not"
        ),
        display_name="FishMask",
        name="fishmask",
        kind="side",
        config=FishMaskConfig,
        apply=apply_fishmask,
        remove=remove_fishmask,
        is_applied=fishmask_applied,
        settings_of=fishmask_settings,
        traits=frozenset({"selects_parameters"}),
        refuses=(Refusal("selects_parameters", "both choose which backbone parameters train"),),
        callback="vleff.methods.fishmask.lightning.FishMask",
        mixin="vleff.methods.fishmask.lightning.FishMaskMixin",
        towers=TOWERS,
        bench_settings={"keep_ratio": 0.005},
        description="FishMask: a fixed global top-k of entries by empirical Fisher information trains",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "FishMaskConfig",
    "apply_fishmask",
    "fishmask_applied",
    "fishmask_masks",
    "fishmask_settings",
    "keep_count",
    "ranked_names",
    "remove_fishmask",
    "select_fishmask",
]
