"""Memory savers for training: GaLore (low-rank optimizer state) and MeZO (forward passes only).

>>> from vleff.memory import GaLoreAdamW, galore_param_groups, MeZO
>>> opt = GaLoreAdamW(galore_param_groups(model, rank=128), lr=1e-4, weight_decay=0.05)

Lightning users add :class:`vleff.callbacks.GaLore` or :class:`vleff.callbacks.MeZO` to the
trainer instead; both convert the optimizer that ``configure_optimizers`` returns
(:mod:`vleff.methods.galore.convert`, :mod:`vleff.methods.mezo.convert`; what they share in :mod:`vleff.optim`).
The methods themselves live in
``vleff/methods/galore/`` and ``vleff/methods/mezo/``; their names are resolved lazily here.
"""

from __future__ import annotations

from vleff._lazy import lazy_getattr

_LAZY = {
    "galore_from_optimizer": "vleff.methods.galore.convert",
    "mezo_from_optimizer": "vleff.methods.mezo.convert",
    "rebind_scheduler": "vleff.optim",
    **{
        name: "vleff.methods.galore"
        for name in (
            "DEFAULT_EXCLUDE",
            "GaLoreAdamW",
            "PROJ_TYPES",
            "galore_param_groups",
            "galore_projection",
            "select_galore_params",
            "wants_decay",
        )
    },
    **{name: "vleff.methods.mezo" for name in ("MeZO", "directions", "perturb_", "spsa_projected_grad")},
}
__getattr__ = lazy_getattr("vleff.memory", _LAZY)
__all__ = sorted(_LAZY)  # noqa: PLE0605 -- a list, built from the table above


def __dir__() -> list[str]:
    return sorted(_LAZY)
