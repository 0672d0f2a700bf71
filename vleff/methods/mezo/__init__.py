"""MeZO: zeroth-order SPSA steps with forward passes only (Malladi et al., NeurIPS 2023).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.mezo.config import MeZOConfig
from vleff.methods.mezo.core import (
    LOW_PRECISION,
    MeZO,
    default_decay,
    directions,
    perturb_,
    spsa_projected_grad,
)
from vleff.registry import Method, Refusal, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        needs_dtensor=(
            "each rank perturbs its own shard with that shard's slice of the whole direction z, which "
            "needs to know where the shard lies in the parameter (a DTensor does); a flattened shard "
            "would draw its own z, the same on every rank (a correlated, not a Gaussian, direction)"
        ),
        display_name="MeZO",
        traits=frozenset({"replaces_optimizer"}),
        refuses=(
            Refusal(
                "replaces_optimizer",
                "both replace the optimizer, and MeZO (no gradients) would silently "
                "discard a gradient optimizer such as GaLore's, or be discarded by it",
            ),
        ),
        name="mezo",
        kind="memory",
        config=MeZOConfig,
        apply=None,
        remove=None,
        callback="vleff.methods.mezo.lightning.MeZO",
        mixin="vleff.methods.mezo.lightning.MeZOMixin",
        towers=(),
        bench_settings={"eps": 1e-3},
        description="MeZO: zeroth-order SPSA steps, forward passes only",
    )
)

__all__ = [
    "LOW_PRECISION",
    "METHOD",
    "MeZO",
    "MeZOConfig",
    "default_decay",
    "directions",
    "perturb_",
    "spsa_projected_grad",
]
