"""Child-Tuning_F (Xu et al., EMNLP 2021), task-free: each step's gradient is masked by a fresh
Bernoulli(p) draw and rescaled by 1/p before the optimizer's moments. A regulariser of full
fine-tuning, not parameter-efficient. :mod:`.core` holds the config and ``apply`` / ``remove``;
the Lightning callback and mixin live in :mod:`.lightning`. Importing this package registers the
method."""

from __future__ import annotations

from vleff.methods.child_tuning_f.core import (
    TOWERS,
    ChildTuningFConfig,
    apply_child_tuning_f,
    child_tuning_f_applied,
    child_tuning_f_settings,
    child_tuning_f_step,
    masked_names,
    remove_child_tuning_f,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="Child-Tuning_F",
        name="child_tuning_f",
        kind="side",
        config=ChildTuningFConfig,
        apply=apply_child_tuning_f,
        remove=remove_child_tuning_f,
        is_applied=child_tuning_f_applied,
        settings_of=child_tuning_f_settings,
        traits=frozenset({"selects_parameters"}),
        refuses=(Refusal("selects_parameters", "both choose which backbone parameters train"),),
        callback="vleff.methods.child_tuning_f.lightning.ChildTuningF",
        mixin="vleff.methods.child_tuning_f.lightning.ChildTuningFMixin",
        towers=TOWERS,
        bench_settings={},
        description="Child-Tuning_F: a fresh Bernoulli(p) gradient mask, scaled by 1/p, every step (a regulariser)",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "ChildTuningFConfig",
    "apply_child_tuning_f",
    "child_tuning_f_applied",
    "child_tuning_f_settings",
    "child_tuning_f_step",
    "masked_names",
    "remove_child_tuning_f",
]
