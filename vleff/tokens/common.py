"""Install and remove method hooks on the towers of a model.

Every hook-based method (ToMe, DynamicViT, EViT ...) is a :class:`~vleff.backbones.TowerHook`
factory; these helpers patch the towers that ``towers`` names with the generic block forward,
attach one hook per tower, and undo both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from vleff.backbones import (
    TowerAdapter,
    TowerHook,
    find_towers,
    get_patch,
    patch_tower,
    unpatch_tower,
)
from vleff.backbones.patch import check_attachable


def tower_modalities(towers: str) -> tuple[str, ...]:
    """``"image"`` / ``"text"`` / ``"all"`` as the modalities to patch."""
    return ("image", "text") if towers == "all" else (towers,)


def select_towers(model: nn.Module, towers: str) -> list[TowerAdapter]:
    """The towers of ``model`` that ``towers`` names; ``TypeError`` (listing the supported
    families) when there is none, so a method never silently does nothing."""
    found = find_towers(model)
    wanted = tower_modalities(towers)
    chosen = [t for t in found if t.modality in wanted]
    skipped = [s for t in found for s in t.skipped_companions()]
    if skipped and len(wanted) > 1:
        warnings.warn(
            f"towers={towers!r}: {type(model).__name__} also has {', '.join(skipped)}, which vleff cannot "
            f"run; only {', '.join(t.describe() for t in chosen) or 'no tower'} is changed. Pass "
            "towers= naming the towers you mean to silence this",
            UserWarning,
            stacklevel=3,
        )
    if not chosen:
        have = ", ".join(t.describe() for t in found)
        raise TypeError(
            f"towers={towers!r}: {type(model).__name__} has no {' or '.join(wanted)} tower "
            f"(it has: {have}); pass towers= naming a tower it has"
        )
    return chosen


def hook_settings(model: nn.Module, name: str) -> dict[str, Any]:
    """The config of the tower hooks called ``name`` in ``model``, as a dict (``{}`` when none),
    with ``towers`` as the set of modalities it means on this model: a method's applied settings
    read back from the model (:meth:`vleff.registry.Method.applied_settings`)."""
    hooks = hooks_named(model, name)
    config = hooks[0].config if hooks and getattr(hooks[0], "config", None) is not None else None
    if config is None:
        return {}
    out = config.as_dict()
    if "towers" in out:
        out["towers"] = towers_meant(model, out["towers"])
    return out


def towers_meant(model: nn.Module, towers: str) -> frozenset[str]:
    """The modalities of ``model``'s towers that ``towers`` names (empty when it has none)."""
    try:
        return frozenset(t.modality for t in find_towers(model) if t.modality in tower_modalities(towers))
    except TypeError:
        return frozenset()


def install_hooks(
    model: nn.Module, make_hook: Callable[[TowerAdapter], TowerHook], towers: str = "image"
) -> list[TowerAdapter]:
    """Attach ``make_hook(tower)`` to every tower of ``model`` that ``towers`` names.

    Every hook is built before any tower is patched, so a bad argument for one tower leaves
    the model untouched.
    """
    chosen = select_towers(model, towers)
    attach_hooks(chosen, [make_hook(tower) for tower in chosen])
    return chosen


def attach_hooks(towers: list[TowerAdapter], hooks: list[TowerHook]) -> None:
    """Patch each tower (idempotent) and add its hook, for methods that build their hooks first
    (to validate every tower before removing an earlier application)."""
    for tower, hook in zip(towers, hooks):  # every tower checked before any is patched
        check_attachable(tower, hook)
    for tower, hook in zip(towers, hooks):
        patch_tower(tower).add_hook(hook)


def remove_hooks(model: nn.Module, name: str) -> int:
    """Remove the hook called ``name`` from every tower; unpatch towers left without hooks.

    Returns how many hooks were removed (0 when the method was not applied).
    """
    removed = 0
    for tower in find_towers(model):
        patch = get_patch(tower.root)
        if patch is None:
            continue
        if patch.remove_hook(name) is not None:
            removed += 1
        if not patch.hooks:
            unpatch_tower(tower.root)
    return removed


def hooks_named(model: nn.Module, name: str) -> list[TowerHook]:
    """The installed hooks called ``name``, one per tower that has it."""
    found = []
    try:
        towers = find_towers(model)
    except TypeError:
        return found
    for tower in towers:
        patch = get_patch(tower.root)
        if patch is not None and (hook := patch.get_hook(name)) is not None:
            found.append(hook)
    return found
