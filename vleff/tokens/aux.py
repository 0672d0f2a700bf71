"""Auxiliary losses of token methods, collected from the model after a forward.

Methods record their extra training losses (DynamicViT keep-ratio and distillation, later
CrossGET/MADTP alignment) in the :class:`~vleff.backbones.TokenState` of the tower forward
that produced them (``state.add_aux_loss(name, weighted_value)``). This module is the single
place that reads them back, so the Lightning callback path (which wraps ``training_step``,
:mod:`vleff.lightning.aux_loss`) and the mixin / plain-PyTorch path
(``loss = task_loss + vleff_aux_loss(model)``) add exactly the same thing.

Losses are *popped*: reading clears them, so using both paths at once never counts a loss
twice, and a later evaluation forward cannot resurrect a stale training graph. A tower keeps
only its latest forward's state: call the model once per training step, or add the aux loss
after each forward yourself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vleff.backbones import find_towers, get_patch

#: where a method that is no tower hook keeps the aux losses of its module's latest forward
#: (AdaLoRA's orthogonal regulariser): ``{name: loss}`` in the module's ``__dict__``
MODULE_AUX_ATTR = "_vleff_module_aux_losses"


def set_module_aux_loss(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Record ``value`` as ``module``'s pending aux loss ``name`` (replacing the previous
    forward's): popped by :func:`pop_aux_losses` like a tower's, for methods whose extra loss
    comes from their parameters rather than from a tower's token state."""
    module.__dict__.setdefault(MODULE_AUX_ATTR, {})[name] = value


def pop_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Aux losses of the latest forward of every patched tower in ``model``, by name (summed
    over towers), and those recorded on its modules (:func:`set_module_aux_loss`), removed so
    they are counted once. Empty if there are none."""
    losses: dict[str, torch.Tensor] = {}
    for module in model.modules():
        pending = module.__dict__.pop(MODULE_AUX_ATTR, None)
        for name, value in (pending or {}).items():
            losses[name] = losses[name] + value if name in losses else value
    try:
        towers = find_towers(model)
    except TypeError:
        return losses
    for tower in towers:
        patch = get_patch(tower.root)
        if patch is None or patch.state is None or not patch.state.aux_losses:
            continue
        for name, value in patch.state.aux_losses.items():
            losses[name] = losses[name] + value if name in losses else value
        patch.state.aux_losses = {}
    return losses


def total_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of :func:`pop_aux_losses` (``None`` when no method produced one)."""
    losses = pop_aux_losses(model)
    if not losses:
        return None
    return torch.stack([v.float().reshape(()) for v in losses.values()]).sum()


def vleff_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the pending aux losses as a scalar (``0.`` when there are none); add it to your loss."""
    total = total_aux_loss(model)
    if total is not None:
        return total
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def add_to_step_output(output: Any, aux: torch.Tensor | None) -> Any:
    """``training_step``'s output with ``aux`` added to its loss.

    Handles what a Lightning ``training_step`` may return: a loss tensor, a dict with a
    ``"loss"`` entry (a new dict is returned), or ``None`` (the step is skipped, so is ``aux``).
    """
    if aux is None or output is None:
        return output
    if isinstance(output, torch.Tensor):
        return output + aux.to(output.dtype)
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return {**output, "loss": output["loss"] + aux.to(output["loss"].dtype)}
    raise TypeError(
        f"cannot add vleff's auxiliary loss to a training_step output of type "
        f"{type(output).__name__}; return a loss tensor or a dict with a 'loss' tensor, "
        "or add vleff_aux_loss() to your loss yourself"
    )
