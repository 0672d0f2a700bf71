"""Parallel adapter (He et al., ICLR 2022) / AdaptFormer (NeurIPS 2022): a scaled bottleneck beside
every block's MLP (:mod:`.core`). The Lightning callback and mixin live in :mod:`.lightning`;
importing this package registers the method."""

from __future__ import annotations

from vleff.methods.parallel_adapter.core import (
    TOWERS,
    ParallelAdapterConfig,
    apply_parallel_adapter,
    parallel_adapter_applied,
    parallel_adapter_num_parameters,
    parallel_adapter_parameters,
    remove_parallel_adapter,
)
from vleff.registry import Method, Refusal, register_method
from vleff.side.common import FREEZES_PEFT_TUNERS

METHOD = register_method(
    Method(
        display_name="Parallel adapter",
        name="parallel_adapter",
        kind="side",
        config=ParallelAdapterConfig,
        apply=apply_parallel_adapter,
        remove=remove_parallel_adapter,
        is_applied=parallel_adapter_applied,
        # the adapter adds to the MLP output through the branch seam; token methods, early exit
        # and other hooks keep working (the tower_hook trait brings the shared refusals)
        traits=frozenset({"tower_hook"}),
        # applying the adapter freezes the backbone, a peft tuner's adapters in it included; a peft
        # tuner applied after it would freeze the adapters: refused both ways, naming both
        refuses=(Refusal("peft_tuner", FREEZES_PEFT_TUNERS),),
        required_on_load=True,
        callback="vleff.methods.parallel_adapter.lightning.ParallelAdapter",
        mixin="vleff.methods.parallel_adapter.lightning.ParallelAdapterMixin",
        towers=TOWERS,
        bench_settings={"bottleneck": 64},
        description="Parallel adapter / AdaptFormer: a scaled bottleneck beside each block's MLP",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "ParallelAdapterConfig",
    "apply_parallel_adapter",
    "remove_parallel_adapter",
    "parallel_adapter_applied",
    "parallel_adapter_num_parameters",
    "parallel_adapter_parameters",
]
