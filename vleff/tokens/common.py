"""Install and remove token-method hooks on the towers of a model.

Every token method (ToMe, DynamicViT, EViT ...) is a :class:`~vleff.backbones.TokenHook`
factory; these helpers patch the right towers with the generic block forward, attach one
hook per tower, and undo both.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from vleff.backbones import Modality, TokenHook, TowerAdapter, find_towers, get_patch, patch_tower, unpatch_tower


def install_hook(model: nn.Module, make_hook: Callable[[TowerAdapter], TokenHook],
                 modality: Modality = "image", prop_attn: bool | None = None) -> list[TowerAdapter]:
    """Attach ``make_hook(tower)`` to every ``modality`` tower of ``model``.

    Raises ``TypeError`` (naming the model class and the supported families) when the model
    has no such tower, so a method never silently does nothing.
    """
    towers = find_towers(model, modality)
    hooks = [make_hook(tower) for tower in towers]  # any bad argument raises before a tower is patched
    for tower, hook in zip(towers, hooks):
        patch = patch_tower(tower)
        patch.add_hook(hook)
        if prop_attn is not None:
            patch.prop_attn = prop_attn
    return towers


def remove_hook(model: nn.Module, name: str) -> int:
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


def hooks_named(model: nn.Module, name: str) -> list[TokenHook]:
    """The installed hooks called ``name``, one per tower that has it."""
    found = []
    for tower in find_towers(model):
        patch = get_patch(tower.root)
        if patch is not None and (hook := patch.get_hook(name)) is not None:
            found.append(hook)
    return found
