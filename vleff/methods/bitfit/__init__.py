"""BitFit (Ben Zaken et al., ACL 2022): only the bias terms (and the task head) train.
:mod:`.core` holds the config and ``apply``/``remove``; the Lightning callback and mixin live in
:mod:`.lightning`. Importing this package registers the method."""

from __future__ import annotations

from vleff.methods.bitfit.core import (
    TOWERS,
    BitFitConfig,
    apply_bitfit,
    bias_names,
    bitfit_applied,
    bitfit_parameters,
    bitfit_settings,
    bitfit_state_dict,
    remove_bitfit,
)
from vleff.registry import Method, Refusal, register_method

METHOD = register_method(
    Method(
        display_name="BitFit",
        name="bitfit",
        kind="side",
        config=BitFitConfig,
        apply=apply_bitfit,
        remove=remove_bitfit,
        is_applied=bitfit_applied,
        settings_of=bitfit_settings,
        traits=frozenset({"selects_parameters"}),
        refuses=(Refusal("selects_parameters", "both choose which backbone parameters train"),),
        callback="vleff.methods.bitfit.lightning.BitFit",
        mixin="vleff.methods.bitfit.lightning.BitFitMixin",
        towers=TOWERS,
        bench_settings={},
        description="BitFit: only the bias terms (and the head) train",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "BitFitConfig",
    "apply_bitfit",
    "bias_names",
    "bitfit_applied",
    "bitfit_parameters",
    "bitfit_settings",
    "bitfit_state_dict",
    "remove_bitfit",
]
