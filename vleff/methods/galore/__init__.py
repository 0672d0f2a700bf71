"""GaLore: Adam moments in a low-rank projection of each 2-D gradient (Zhao et al., ICML 2024).

The method's folder: :mod:`.core` holds its config, hooks and ``apply``/``remove``; the
Lightning callback and mixin live beside it and the core never imports them. Importing this
package registers the method (:mod:`vleff.registry` finds it by its folder).
"""

from __future__ import annotations

from vleff.methods.galore.config import (
    DEFAULT_EXCLUDE,
    DEFAULT_SVD,
    PROJ_TYPES,
    SVD_METHODS,
    GaLoreConfig,
)
from vleff.methods.galore.core import GaLoreAdamW, galore_projection
from vleff.methods.galore.selection import (
    galore_param_groups,
    select_galore_params,
    wants_decay,
)
from vleff.registry import Method, register_method

#: the registry entry: everything vleff's generic code (CLIs, conformance suite, callbacks) knows of the method
METHOD = register_method(
    Method(
        needs_dtensor=(
            "its sharded step places each rank's rows of a weight in the whole (the rows its moments and its "
            "rows of the projection belong to), which a DTensor says and a flattened shard does not"
        ),
        display_name="GaLore",
        traits=frozenset({"replaces_optimizer"}),
        name="galore",
        kind="memory",
        config=GaLoreConfig,
        apply=None,
        remove=None,
        callback="vleff.methods.galore.lightning.GaLore",
        mixin="vleff.methods.galore.lightning.GaLoreMixin",
        towers=(),
        bench_settings={"rank": 128},
        description="GaLore: Adam moments in a low-rank projection of each 2-D gradient",
    )
)

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_SVD",
    "GaLoreAdamW",
    "GaLoreConfig",
    "METHOD",
    "PROJ_TYPES",
    "SVD_METHODS",
    "galore_param_groups",
    "galore_projection",
    "select_galore_params",
    "wants_decay",
]
