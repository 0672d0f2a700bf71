"""MeZO from the optimizer a user built: same parameters and learning rate, decay by the reference's rule."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from vleff.checks import check_patterns
from vleff.methods.mezo.core import MeZO, Reduce
from vleff.optim import (
    IMPLEMENTATION_KEYS,
    check_fresh,
    named_parameters,
    names_by_id,
    wants_decay,
)


def mezo_from_optimizer(
    optimizer: Optimizer | None,
    model: nn.Module | Iterable[tuple[str, torch.Tensor]],
    *,
    lr: float | None = None,
    eps: float = 1e-3,
    weight_decay: float | None = None,
    params: str | Sequence[str] | None = None,
    seed: int = 0,
    reduce: Reduce | None = None,
    allow_low_precision: bool = False,
) -> MeZO:
    """A :class:`MeZO` optimizer over ``optimizer``'s parameters (or all trainable ones).

    ``lr``/``weight_decay`` override every group's value when given (``initial_lr`` too, so a
    scheduler rebound with :func:`rebind_scheduler` scales the new lr); otherwise the groups'
    own values are used. ``params`` (regular expressions on names) trains a subset. Parameters
    with ``requires_grad=False`` are left out (as AdamW leaves them alone). Biases, norms and
    embeddings get no weight decay (per-parameter ``"decay"`` mask). bf16/fp16 trainable
    parameters are refused unless ``allow_low_precision`` (see :class:`MeZO`).
    """
    if not eps > 0:
        raise ValueError(f"eps={eps!r} is not allowed; MeZO's perturbation size must be > 0")
    pairs = named_parameters(model)
    names = names_by_id(pairs)
    compiled = [re.compile(p) for p in check_patterns("params", params)]

    def keep(p: torch.Tensor) -> bool:
        # frozen parameters stay out even when they sit in the optimizer's groups: AdamW skips
        # them (no .grad), and MeZO must not perturb or update what the user froze
        name = names.get(id(p))
        return p.requires_grad and name is not None and (not compiled or any(r.search(name) for r in compiled))

    if optimizer is None:
        if lr is None:
            raise ValueError("MeZO needs lr=... when configure_optimizers returns no optimizer")
        source = [{"params": [p for _, p in pairs if p.requires_grad], "lr": lr, "weight_decay": weight_decay or 0.0}]
    else:
        check_fresh(optimizer, "MeZO")
        source = optimizer.param_groups
    groups = []
    for g in source:
        chosen = [p for p in g["params"] if keep(p)]
        new = {k: v for k, v in g.items() if k not in IMPLEMENTATION_KEYS and k not in ("betas", "momentum")}
        new["params"] = chosen
        new["decay"] = [wants_decay(names[id(p)], p) for p in chosen]
        new["eps"] = eps
        if lr is not None:
            new["lr"] = lr
            if "initial_lr" in new:
                new["initial_lr"] = lr
        if weight_decay is not None:
            new["weight_decay"] = weight_decay
        new.setdefault("weight_decay", 0.0)
        groups.append(new)
    if not any(g["params"] for g in groups):
        raise ValueError(
            f"MeZO selected no parameter: params={params!r} matched none of the optimizer's "
            f"trainable (requires_grad=True) parameters (some names: {[n for n, _ in pairs][:6]})"
        )
    return MeZO(groups, lr=groups[0]["lr"], eps=eps, seed=seed, reduce=reduce, allow_low_precision=allow_low_precision)
