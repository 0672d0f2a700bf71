"""GaLore from the optimizer a user built: same parameter groups, learning rate, betas and decay."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from vleff.methods.galore.config import DEFAULT_EXCLUDE, GaLoreConfig
from vleff.methods.galore.core import GaLoreAdamW
from vleff.methods.galore.selection import select_galore_params
from vleff.optim import IMPLEMENTATION_KEYS, check_fresh, named_parameters, names_by_id


def galore_from_optimizer(
    optimizer: Optimizer,
    model: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    rank: int = GaLoreConfig.rank,
    update_proj_gap: int = GaLoreConfig.update_proj_gap,
    scale: float = GaLoreConfig.scale,
    proj_type: str = GaLoreConfig.proj_type,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    svd: str = GaLoreConfig.svd,
) -> GaLoreAdamW:
    """A :class:`GaLoreAdamW` with ``optimizer``'s groups and hyperparameters.

    ``optimizer`` must be :class:`torch.optim.AdamW` or :class:`torch.optim.Adam` (with
    ``amsgrad`` and ``maximize`` off); Adam's L2 weight decay stays L2
    (``decoupled_weight_decay=False``). The parameters selected by ``targets``/``exclude``
    (see :func:`~vleff.methods.galore.selection.select_galore_params`) are projected with ``rank``.
    """
    if isinstance(optimizer, GaLoreAdamW):
        return optimizer
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"GaLore converts torch.optim.AdamW or torch.optim.Adam, got {type(optimizer).__name__}; "
            "build vleff.memory.GaLoreAdamW yourself (GaLoreMixin) for other optimizers"
        )
    check_fresh(optimizer, "GaLoreAdamW")
    pairs = named_parameters(model)
    names = names_by_id(pairs)
    in_optimizer = [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"] if id(p) in names]
    selected = set(select_galore_params(in_optimizer, targets, exclude))
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize"):
            if g.get(key):
                raise ValueError(f"param_groups[{i}] has {key}=True, which GaLoreAdamW does not support")
        decoupled = bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        new = {k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS}
        new.update(
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            svd=svd,
            decoupled_weight_decay=decoupled,
            project=[names.get(id(p)) in selected for p in g["params"]],
        )
        groups.append(new)
    return GaLoreAdamW(groups, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd)
