"""Turn the optimizer a user already built into GaLore or MeZO, keeping its param groups.

Groups stay one-to-one with the user's (same order, same ``lr``/``initial_lr``/``betas``/
``weight_decay`` and any custom keys), so an LR scheduler built on the old optimizer keeps
working once it is pointed at the new one with :func:`rebind_scheduler` — its per-group lists
(``base_lrs``, ``lr_lambdas`` ...) still line up. Which parameters GaLore projects and which
get MeZO's weight decay are per-parameter masks inside each group (``"project"``, ``"decay"``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import wraps
from typing import Any
from weakref import ref

import torch
from torch import nn
from torch.optim import Optimizer

from vleff.checks import check_patterns
from vleff.methods.galore.config import DEFAULT_EXCLUDE, GaLoreConfig
from vleff.methods.galore.core import GaLoreAdamW
from vleff.methods.galore.selection import select_galore_params, wants_decay
from vleff.methods.mezo.core import MeZO, Reduce

__all__ = ["galore_from_optimizer", "mezo_from_optimizer", "rebind_scheduler"]

# torch.optim.Adam(W) implementation switches that have no meaning for the converted optimizer
_IMPLEMENTATION_KEYS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused",
                        "decoupled_weight_decay")


def _named(model: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters() if isinstance(model, nn.Module) else model)


def _names_by_id(pairs: list[tuple[str, torch.Tensor]]) -> dict[int, str]:
    return {id(p): n for n, p in pairs}


def _check_fresh(optimizer: Optimizer, target: str) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(f"cannot convert {type(optimizer).__name__} to {target} after it has stepped (its state "
                         "holds moments); convert before the first step, then load checkpoints into the result")


def galore_from_optimizer(optimizer: Optimizer, model: nn.Module | Iterable[tuple[str, torch.Tensor]], *,
                          rank: int = GaLoreConfig.rank, update_proj_gap: int = GaLoreConfig.update_proj_gap,
                          scale: float = GaLoreConfig.scale, proj_type: str = GaLoreConfig.proj_type,
                          targets: str | Sequence[str] | None = None,
                          exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
                          svd: str = GaLoreConfig.svd) -> GaLoreAdamW:
    """A :class:`GaLoreAdamW` with ``optimizer``'s groups and hyperparameters.

    ``optimizer`` must be :class:`torch.optim.AdamW` or :class:`torch.optim.Adam` (with
    ``amsgrad`` and ``maximize`` off); Adam's L2 weight decay stays L2
    (``decoupled_weight_decay=False``). The parameters selected by ``targets``/``exclude``
    (see :func:`~vleff.methods.galore.selection.select_galore_params`) are projected with ``rank``.
    """
    if isinstance(optimizer, GaLoreAdamW):
        return optimizer
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"GaLore converts torch.optim.AdamW or torch.optim.Adam, got {type(optimizer).__name__}; "
                            "build vleff.memory.GaLoreAdamW yourself (GaLoreMixin) for other optimizers")
    _check_fresh(optimizer, "GaLoreAdamW")
    pairs = _named(model)
    names = _names_by_id(pairs)
    in_optimizer = [(names[id(p)], p) for g in optimizer.param_groups for p in g["params"] if id(p) in names]
    selected = set(select_galore_params(in_optimizer, targets, exclude))
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        for key in ("amsgrad", "maximize"):
            if g.get(key):
                raise ValueError(f"param_groups[{i}] has {key}=True, which GaLoreAdamW does not support")
        decoupled = bool(g.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        new = {k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS}
        new.update(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, svd=svd,
                   decoupled_weight_decay=decoupled,
                   project=[names.get(id(p)) in selected for p in g["params"]])
        groups.append(new)
    return GaLoreAdamW(groups, rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                       svd=svd)


def mezo_from_optimizer(optimizer: Optimizer | None, model: nn.Module | Iterable[tuple[str, torch.Tensor]], *,
                        lr: float | None = None, eps: float = 1e-3, weight_decay: float | None = None,
                        params: str | Sequence[str] | None = None, seed: int = 0,
                        reduce: Reduce | None = None, allow_low_precision: bool = False) -> MeZO:
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
    pairs = _named(model)
    names = _names_by_id(pairs)
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
        _check_fresh(optimizer, "MeZO")
        source = optimizer.param_groups
    groups = []
    for g in source:
        chosen = [p for p in g["params"] if keep(p)]
        new = {k: v for k, v in g.items() if k not in _IMPLEMENTATION_KEYS and k not in ("betas", "momentum")}
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
        raise ValueError(f"MeZO selected no parameter: params={params!r} matched none of the optimizer's "
                         f"trainable (requires_grad=True) parameters (some names: {[n for n, _ in pairs][:6]})")
    return MeZO(groups, lr=groups[0]["lr"], eps=eps, seed=seed, reduce=reduce, allow_low_precision=allow_low_precision)


def _track_step_for_scheduler(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` the way an LR scheduler does when it is built, so the rebound
    scheduler does not warn that ``optimizer.step()`` was overridden or never called."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    opt_ref = ref(optimizer)
    step = type(optimizer).step

    @wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def rebind_scheduler(scheduler: Any, old: Optimizer, new: Optimizer,
                     base_lr: float | None = None) -> None:
    """Point ``scheduler`` (and the schedulers it chains) from ``old`` to ``new``.

    ``base_lr`` replaces the scheduler's base learning rates (MeZO with an explicit ``lr``).
    """
    children: list[Any] = list(getattr(scheduler, "_schedulers", []) or [])
    for child in children:
        rebind_scheduler(child, old, new, base_lr)
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        _track_step_for_scheduler(new)
        if base_lr is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [base_lr] * len(new.param_groups)

