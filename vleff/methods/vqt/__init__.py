"""VQT: visual query tuning, per-layer queries beside a frozen backbone (Tu et al., CVPR 2023).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.vqt.core import (
    TOWERS,
    VQTConfig,
    apply_vqt,
    freeze_backbone_for_vqt,
    remove_vqt,
    vqt_applied,
    vqt_parameters,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        unsharded=(
            "its queries read every block's keys and values through the token state, so gradients reach the "
            "blocks' weights after FSDP has freed their gathered copies"
        ),
        display_name="VQT",
        # the declarative contract: what the method does, what it refuses, what update may change
        traits=frozenset({"tower_hook", "reads_full_stream"}),
        refuses=(
            Refusal(
                "reduces_tokens",
                "VQT's queries read each block's keys/values of the full frozen token "
                "stream, which token reduction changes",
            ),
        ),
        required_on_load=True,
        name="vqt",
        kind="side",
        config=VQTConfig,
        apply=apply_vqt,
        remove=remove_vqt,
        is_applied=vqt_applied,
        callback="vleff.methods.vqt.lightning.VisualQueryTuning",
        mixin="vleff.methods.vqt.lightning.VQTMixin",
        towers=TOWERS,
        bench_settings={"num_queries": 1},
        description="VQT: per-layer query tokens beside the frozen stream (sliced K/V), zero-init head projection",
    )
)

__all__ = [
    "METHOD",
    "TOWERS",
    "VQTConfig",
    "apply_vqt",
    "freeze_backbone_for_vqt",
    "remove_vqt",
    "vqt_applied",
    "vqt_parameters",
]
