"""Side methods whose trained module lives on each tower root and is reached through a tower hook
(the adapters of :mod:`vleff.side.bottleneck`, the prompts of :mod:`vleff.side.prompts`): applying
and removing them exactly is the same whatever the hook does, and is written here once.

Apply: every tower checked and every module built before the model changes; the hook attached;
the module registered on the tower root; the tower's input-gradient hooks attached
(:mod:`vleff.backbones.input_grads`); the backbone frozen as every side method freezes it.
Remove: the reverse, the ``requires_grad`` flags as they were — and backbone weights the module
kept trainable (``backbone_trainable``, the serial adapter's LayerNorms) frozen again while another
side method is still applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from vleff.backbones import TowerAdapter, TowerHook, find_towers
from vleff.backbones.input_grads import attach_input_grads, detach_input_grads
from vleff.side.common import freeze_on_apply, restore_on_remove, side_modules, side_towers
from vleff.tokens.common import attach_hooks, hooks_named, remove_hooks, select_towers

M = TypeVar("M", bound=nn.Module)


def attach_hooked(
    model: nn.Module,
    name: str,
    module_name: str,
    config: Any,
    make_module: Callable[[TowerAdapter], nn.Module],
    make_hook: Callable[[str, TowerAdapter, Any, Any], TowerHook],
    refuse_conflicts: Callable[[nn.Module, str], None],
    module_type: type[nn.Module],
) -> nn.Module:
    """Apply a hooked side method to the towers ``config.towers`` names (in place): one
    ``make_module(tower)`` registered on each tower root as ``module_name`` (an instance of
    ``module_type``, which holds ``input_hooks``), its hook ``make_hook(name, tower, module, config)``
    on the tower. Applying again replaces the earlier modules (drawn anew)."""
    if hooks_named(model, name):
        detach_hooked(model, name, module_name, module_type)
    refuse_conflicts(model, name)
    chosen = select_towers(model, config.towers)
    modules = []
    for tower in chosen:
        module = make_module(tower)
        weight = next(tower.root.parameters())
        module.to(device=weight.device, dtype=weight.dtype)
        module.train(tower.root.training)  # the model's mode (an eval model draws no dropout)
        modules.append(module)
    attach_hooks(chosen, [make_hook(name, t, m, config) for t, m in zip(chosen, modules, strict=True)])
    for tower, module in zip(chosen, modules, strict=True):
        tower.root.add_module(module_name, module)
        module.input_hooks = attach_input_grads([tower])
    freeze_on_apply(model)
    return model


def detach_hooked(model: nn.Module, name: str, module_name: str, module_type: type[nn.Module]) -> nn.Module:
    """Undo :func:`attach_hooked` exactly: no hook, no module, no input hook, the flags as before."""
    if not hooks_named(model, name):
        raise ValueError(f"{name} is not applied to this {type(model).__name__}; nothing to remove")
    kept: list[nn.Parameter] = []  # backbone weights this method trained (the serial adapter's LayerNorms)
    for tower in find_towers(model):
        module = tower.root._modules.get(module_name)
        if isinstance(module, module_type):
            kept += _backbone_trainable(module, tower.root)
            if module.input_hooks is not None:
                detach_input_grads(module.input_hooks)
            del tower.root._modules[module_name]
    remove_hooks(model, name)
    restore_on_remove(model)
    if side_towers(model):  # another side method is left: the backbone stays frozen, these weights too
        still = {id(p) for m in side_modules(model) for p in _backbone_trainable(m, _root(model, m))}
        for p in kept:
            if id(p) not in still:
                p.requires_grad_(False)
    return model


def hooked_modules(model: nn.Module, module_name: str, module_type: type[M]) -> list[M]:
    """The method's modules, one per tower that carries it."""
    try:
        towers = find_towers(model)
    except TypeError:
        return []
    return [m for t in towers if isinstance(m := t.root._modules.get(module_name), module_type)]


def _backbone_trainable(module: nn.Module, root: nn.Module) -> list[nn.Parameter]:
    return list(getattr(module, "backbone_trainable", lambda r: [])(root))


def _root(model: nn.Module, module: nn.Module) -> nn.Module:
    """The tower root that holds the side ``module``."""
    return next(t.root for t in find_towers(model) if any(c is module for c in t.root._modules.values()))
