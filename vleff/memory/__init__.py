"""Memory savers for training: GaLore (low-rank optimizer state) and MeZO (forward passes only).

>>> from vleff.memory import GaLoreAdamW, galore_param_groups, MeZO
>>> opt = GaLoreAdamW(galore_param_groups(model, rank=128), lr=1e-4, weight_decay=0.05)

Lightning users add :class:`vleff.callbacks.GaLore` or :class:`vleff.callbacks.MeZO` to the
trainer instead; both convert the optimizer that ``configure_optimizers`` returns.
"""
from vleff.memory.convert import galore_from_optimizer, mezo_from_optimizer
from vleff.memory.galore import PROJ_TYPES, GaLoreAdamW, galore_projection
from vleff.memory.mezo import MeZO, directions, perturb_, spsa_projected_grad
from vleff.memory.selection import DEFAULT_EXCLUDE, galore_param_groups, select_galore_params, wants_decay

__all__ = [
    "DEFAULT_EXCLUDE",
    "GaLoreAdamW",
    "MeZO",
    "PROJ_TYPES",
    "directions",
    "galore_from_optimizer",
    "galore_param_groups",
    "galore_projection",
    "mezo_from_optimizer",
    "perturb_",
    "select_galore_params",
    "spsa_projected_grad",
    "wants_decay",
]
