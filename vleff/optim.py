"""What the optimizer-replacing methods share: the weight-decay rule (which parameters decay), and
converting a user's optimizer (parameter names, the fresh-optimizer check, LR schedulers rebound)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import wraps
from typing import Any
from weakref import ref

import torch
from torch import nn
from torch.optim import Optimizer

# torch.optim.Adam(W) implementation switches that have no meaning for the converted optimizer
IMPLEMENTATION_KEYS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)


def named_parameters(model: nn.Module | Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters() if isinstance(model, nn.Module) else model)


def names_by_id(pairs: list[tuple[str, torch.Tensor]]) -> dict[int, str]:
    return {id(p): n for n, p in pairs}


def check_fresh(optimizer: Optimizer, target: str) -> None:
    if any(len(s) for s in optimizer.state.values()):
        raise ValueError(
            f"cannot convert {type(optimizer).__name__} to {target} after it has stepped (its state "
            "holds moments); convert before the first step, then load checkpoints into the result"
        )


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


def rebind_scheduler(scheduler: Any, old: Optimizer, new: Optimizer, base_lr: float | None = None) -> None:
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


#: names that never get weight decay (besides every parameter with fewer than two dims)
NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"bias$",
    r"(^|\.)(ln|norm)|layernorm|layer_norm|ln_\w*",
    r"logit_scale|logit_bias",
    r"embedding|pos_embed|cls_token",
)


def wants_decay(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: not to biases, norms, embeddings-like vectors or scalars."""
    if param.ndim < 2:
        return False
    return not any(re.search(pat, name) for pat in NO_DECAY_PATTERNS)
