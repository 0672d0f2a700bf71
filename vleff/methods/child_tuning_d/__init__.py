"""Child-Tuning_D (Xu et al., EMNLP 2021), task-driven: the Fisher information of the training
data fixes which entries of the encoder blocks receive gradients (one joint percentile threshold
keeps the top p); everything else updates in full. A regulariser of full fine-tuning, not
parameter-efficient. :mod:`.core` holds the config, ``apply`` / ``remove`` and
``select_child_tuning_d``; the Lightning callback and mixin live in :mod:`.lightning`. Importing
this package registers the method."""

from __future__ import annotations

from vleff.methods.child_tuning_d.core import (
    TOWERS,
    ChildTuningDConfig,
    apply_child_tuning_d,
    child_tuning_d_applied,
    child_tuning_d_masks,
    child_tuning_d_settings,
    masked_names,
    remove_child_tuning_d,
    select_child_tuning_d,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="Child-Tuning_D",
        name="child_tuning_d",
        kind="side",
        config=ChildTuningDConfig,
        apply=apply_child_tuning_d,
        remove=remove_child_tuning_d,
        is_applied=child_tuning_d_applied,
        settings_of=child_tuning_d_settings,
        traits=frozenset({"selects_parameters"}),
        refuses=(Refusal("selects_parameters", "both choose which backbone parameters train"),),
        callback="vleff.methods.child_tuning_d.lightning.ChildTuningD",
        mixin="vleff.methods.child_tuning_d.lightning.ChildTuningDMixin",
        towers=TOWERS,
        needs_dtensor=(
            "its sharded masks are cut from whole masks by where each rank's shard lies, which a DTensor "
            "says and a flattened shard does not"
        ),
        bench_settings={},
        description="Child-Tuning_D: a fixed Fisher-selected top-p of the blocks' gradient entries (a regulariser)",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "ChildTuningDConfig",
    "apply_child_tuning_d",
    "child_tuning_d_applied",
    "child_tuning_d_masks",
    "child_tuning_d_settings",
    "masked_names",
    "remove_child_tuning_d",
    "select_child_tuning_d",
]
