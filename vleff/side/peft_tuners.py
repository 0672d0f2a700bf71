"""What every ``peft`` tuner method of vleff shares (DoRA, IA³, AdaLoRA, LoHa, LoKr, OFT): targets
from the per-family role table, injection in place, exact removal, the adapter-only state — and
:class:`PeftTuner`, which binds them for one tuner so its folder holds only its config and how
its ``peft`` config is built.

``peft`` does the adapter arithmetic; this module only decides *where* (the towers' blocks,
:data:`vleff.backbones.targets.PEFT_TARGETS`) and keeps vleff's guarantees around it:

* the model keeps its class and attribute names (``inject_adapter_in_model``, or a ``peft``
  tuner class built on the model in place when the tuner needs model-level state, AdaLoRA's
  rank allocator; that tuner object is kept on the model as a plain attribute, never as a
  submodule, so ``state_dict`` and ``named_parameters`` see only the adapters);
* only the new adapter parameters train (and a timm classifier head with ``train_head``;
  parameters of other vleff modules, ``vleff_*``, keep their flags);
* :func:`remove_tuner` puts back the very modules ``peft`` wrapped, the ``requires_grad``
  flags and the ``peft_config`` attribute as they were, so names, flags and ``state_dict``
  keys are the library's again.

The methods name themselves (``method``); this module names none (a shared layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vleff.backbones import TowerAdapter
from vleff.backbones.input_grads import attach_input_grads, detach_input_grads
from vleff.tokens.common import select_towers

#: the tag each ``peft`` layer :func:`inject_tuner` added carries: the method's name (so the method
#: is found applied from any module holding one of its layers, not only from the one it was applied to)
LAYER_TAG = "_vleff_peft_method"
#: a class attribute a frozen base layer sets to ``True`` when its persistent buffers are rebuilt
#: from the base model by applying the method (QLoRA's NF4 codes and scales): they are frozen base
#: state, left out of adapter-only checkpoints like the frozen base parameters
REBUILT_BASE_BUFFERS = "vleff_rebuilt_base_buffers"
#: the adapter name inside ``peft``'s layers
ADAPTER = "default"
#: where :func:`inject_tuner` keeps what it changed: ``{"method", "flags", "added_config",
#: "adapters" (names of the new parameters), "hooks", "tuner", "settings", "towers"}``
STATE_ATTR = "_vleff_peft"


@contextmanager
def data_parallel_mesh_hidden(model: nn.Module) -> Iterator[None]:
    """Hide ``model._device_mesh`` from ``peft`` while it injects adapters.

    ``peft`` takes a model's ``_device_mesh`` for a transformers tensor-parallel plan and then reads
    ``model.config``; Lightning's ``ModelParallelStrategy`` sets ``_device_mesh`` on every
    LightningModule (a data-parallel mesh, for ``configure_model``), so injecting into the module a
    callback targets failed with ``AttributeError: ... no attribute 'config'`` under FSDP2."""
    if "_device_mesh" not in model.__dict__:
        yield
        return
    mesh = model.__dict__.pop("_device_mesh")
    try:
        yield
    finally:
        model.__dict__["_device_mesh"] = mesh


def tuner_targets(
    towers: list[TowerAdapter],
    roles: tuple[str, ...],
    model: nn.Module,
    refuse: Callable[[TowerAdapter], TypeError],
    parameters: bool = False,
) -> tuple[list[str], list[str]]:
    """``(module names, parameter names)`` relative to ``model`` that play ``roles`` in every
    block of ``towers``. A tower whose family has no row for a role, or a row that is a bare
    parameter when the tuner cannot wrap one (``parameters=False``), raises ``refuse(tower)``
    before anything changes."""
    names = {id(m): n for n, m in model.named_modules()}
    modules: list[str] = []
    params: list[str] = []
    for tower in towers:
        for block in tower.blocks():
            for role in roles:
                mods, pars = tower.peft_targets(names[id(block)], role)
                if (not mods and not pars) or (pars and not parameters):
                    raise refuse(tower)
                modules += [m.lstrip(".") for m in mods]
                params += [p.lstrip(".") for p in pars]
    return modules, params


def chosen_towers(model: nn.Module, towers: str) -> list[TowerAdapter]:
    return select_towers(model, towers)


def inject_tuner(
    model: nn.Module,
    method: str,
    peft_config: Any,
    towers: list[TowerAdapter],
    train_head: bool,
    settings: dict[str, Any],
    tuner_class: type | None = None,
) -> nn.Module:
    """Add ``peft_config``'s adapters to ``model`` in place (``inject_adapter_in_model``, or
    ``tuner_class(model, peft_config, ADAPTER)`` when given) and train only them (and the timm
    heads with ``train_head``); records what :func:`remove_tuner` needs under ``method``."""
    from peft import inject_adapter_in_model

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {id(p) for p in model.parameters()}
    added_config = "peft_config" not in model.__dict__
    tuner = None
    with data_parallel_mesh_hidden(model):
        if tuner_class is None:
            inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
        else:
            tuner = tuner_class(model, peft_config, ADAPTER)
    adapters = [n for n, p in model.named_parameters() if id(p) not in before]
    for _, _, layer in tuner_layers(model):
        layer.__dict__[LAYER_TAG] = method
    heads = {
        id(p)
        for t in towers
        if train_head and t.classifier_head() is not None
        for p in t.classifier_head().parameters()
    }
    # the adapters train as peft marked them (AdaLoRA's ``ranknum`` is a parameter peft keeps frozen)
    peft_flags = {n: p.requires_grad for n, p in model.named_parameters() if n in set(adapters)}
    for name, p in model.named_parameters():
        if name in peft_flags:
            p.requires_grad_(peft_flags[name])
        elif id(p) in heads:
            p.requires_grad_(True)
        elif "vleff_" not in name:  # another vleff method's own modules are its business
            p.requires_grad_(False)
    hooks = attach_input_grads(towers)
    record = {
        "method": method,
        "flags": flags,
        "added_config": added_config,
        "adapters": adapters,
        "hooks": hooks,
        "tuner": tuner,
        "settings": dict(settings),
        "towers": frozenset(t.modality for t in towers),
    }
    object.__setattr__(model, STATE_ATTR, record)  # a plain attribute: deep-copies and pickles with the model
    return model


def holder(model: nn.Module, method: str | None = None) -> nn.Module | None:
    """The module inside ``model`` (``model`` itself first) that :func:`inject_tuner` applied
    ``method`` (any tuner when ``None``) to, or ``None``."""
    for module in model.modules():
        record = module.__dict__.get(STATE_ATTR)
        if record is not None and (method is None or record["method"] == method):
            return module
    return None


def tuner_in(model: nn.Module, method: str) -> bool:
    """Whether ``model`` holds ``method``'s ``peft`` layers (applied to it, a submodule or a module above it)."""
    return holder(model, method) is not None or any(m.__dict__.get(LAYER_TAG) == method for m in model.modules())


def record_of(model: nn.Module, method: str) -> dict[str, Any] | None:
    found = holder(model, method)
    return None if found is None else found.__dict__[STATE_ATTR]


def tuner_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, child name, peft layer)`` for every outermost ``peft`` layer in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found, seen = [], set()
    for parent in model.modules():
        if id(parent) in seen:
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, BaseTunerLayer):
                found.append((parent, child_name, child))
                seen.update(id(m) for m in child.modules())
    return found


def remove_tuner(model: nn.Module, method: str, label: str) -> nn.Module:
    """Undo :func:`inject_tuner` of ``method`` on ``model`` (or the submodule it was applied to):
    every ``peft`` layer replaced in its parent by the module it wraps (the very module: the
    library's keys and values), the input hooks dropped, the ``peft_config`` attribute and the
    ``requires_grad`` flags as they were."""
    target = holder(model, method)
    if target is None:
        where = "; it was applied to a module holding this one: remove it there" if tuner_in(model, method) else ""
        raise ValueError(f"{label} is not applied to this {type(model).__name__}; nothing to remove{where}")
    record = target.__dict__.pop(STATE_ATTR)
    for parent, child_name, layer in tuner_layers(target):
        base = layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        setattr(parent, child_name, base)
    detach_input_grads(record["hooks"])
    if record["added_config"]:
        target.__dict__.pop("peft_config", None)
    for name, p in target.named_parameters():
        if name in record["flags"]:
            p.requires_grad_(record["flags"][name])
    return model


def adapter_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The trainable parameters ``method``'s ``peft`` layers added (empty when it is not applied;
    peft's frozen bookkeeping parameters, AdaLoRA's ``ranknum``, left out)."""
    target = holder(model, method)
    if target is None:
        return []
    params = dict(target.named_parameters())
    return [params[n] for n in target.__dict__[STATE_ATTR]["adapters"] if n in params and params[n].requires_grad]


def adapter_state_dict(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The adapters' and every trainable parameter's state (keys relative to ``model``)."""
    target = holder(model, method)
    if target is None:
        raise ValueError(f"{method} is not applied to this {type(model).__name__}")
    prefix = next(n for n, m in model.named_modules() if m is target)
    prefix = f"{prefix}." if prefix else ""
    keep = {prefix + n for n in target.__dict__[STATE_ATTR]["adapters"]}
    keep |= {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def frozen_base_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys of ``model`` that are frozen parameters of a module a tuner was
    applied to and not adapters, and the persistent buffers of its layers marked
    :data:`REBUILT_BASE_BUFFERS`: what an adapter-only checkpoint leaves out."""
    frozen: set[str] = set()
    for prefix, module in model.named_modules():
        record = module.__dict__.get(STATE_ATTR)
        if record is None:
            continue
        head = f"{prefix}." if prefix else ""
        adapters = set(record["adapters"])
        frozen |= {head + n for n, p in module.named_parameters() if not p.requires_grad and n not in adapters}
        for name, sub in module.named_modules():
            if getattr(type(sub), REBUILT_BASE_BUFFERS, False):
                sub_head = f"{head}{name}." if name else head
                buffers = dict(sub.named_buffers())  # the non-persistent ones are not in state_dict
                frozen |= {sub_head + n for n in sub.state_dict(keep_vars=True) if n in buffers}
    return frozen


def applied_settings(model: nn.Module, method: str) -> dict[str, Any]:
    """``method``'s settings as applied (``towers``: the set of modalities carrying it)."""
    record = record_of(model, method)
    if record is None:
        return {}
    settings = {k: v for k, v in record["settings"].items() if k != "towers"}
    return {**settings, "towers": record["towers"]}


def tuner_of(model: nn.Module, method: str) -> Any:
    """The ``peft`` tuner object kept for ``method`` (AdaLoRA's ``AdaLoraModel``), or ``None``."""
    record = record_of(model, method)
    return None if record is None else record["tuner"]


def applied_tuner(model: nn.Module) -> str | None:
    """The name of the ``peft`` tuner method applied to ``model`` (or a submodule), if any."""
    found = holder(model)
    return None if found is None else found.__dict__[STATE_ATTR]["method"]


def refuse_bare_parameters(tower: TowerAdapter, label: str, supported: str, why: str) -> TypeError:
    """The error for a tower a tuner cannot wrap: names the tower, what is supported and why."""
    return tower.unsupported(label, f"{supported} ({why})")


@dataclass(frozen=True)
class PeftTuner:
    """Everything one ``peft`` tuner method of vleff is besides its config: where it goes and how
    its ``peft`` config is built. The rest — replace an earlier application, refuse a tower the
    tuner cannot wrap before anything changes, refuse a conflicting method, inject in place, remove
    exactly, the adapter parameters and state, the settings as applied — is the same for every
    tuner and lives here, once.

    Attributes:
        name: the registry name (``"loha"``), also the tag of its layers.
        label: how messages name it (``"LoHa"``).
        supported: the towers it wraps, for the refusal of one it cannot.
        why_not_bare: why a tower whose q/k/v are bare parameters (open_clip's
            ``in_proj_weight``) is refused.
        peft_config: ``peft_config(config, targets) -> peft config``; ``targets`` are
            keyword arguments of the ``peft`` config (``target_modules=[...]``, ...).
        roles: the roles of :data:`vleff.backbones.targets.PEFT_TARGETS` it wraps.
        feedforward_roles: roles among ``roles`` that are also ``feedforward_modules`` (IA³
            scales their input instead of their output).
        tuner_class: a ``peft`` tuner class built on the model in place (AdaLoRA's rank
            allocator needs it), or ``None`` for ``inject_adapter_in_model``.
        refuse_conflicts: ``refuse_conflicts(model, name)`` raises when a method applied to
            ``model`` conflicts with this one (the registry's
            :func:`vleff.registry.refuse_applied_conflicts`, passed in by the method's folder: the
            shared layers sit below the registry and do not import it).
    """

    name: str
    label: str
    supported: str
    why_not_bare: str
    peft_config: Callable[[Any, dict[str, list[str]]], Any]
    roles: tuple[str, ...] = ("attention_in",)
    feedforward_roles: tuple[str, ...] = ()
    tuner_class: Callable[[], type] | None = None
    refuse_conflicts: Callable[[nn.Module, str], None] = field(kw_only=True)

    def targets(self, model: nn.Module, towers: str = "all", roles: tuple[str, ...] | None = None) -> list[str]:
        """Full names (relative to ``model``) of the modules it wraps in ``towers`` (``roles``:
        a subset of its roles); ``TypeError`` naming the tower and what is supported for a tower it
        cannot wrap."""
        refuse = lambda t: refuse_bare_parameters(t, self.label, self.supported, self.why_not_bare)
        return tuner_targets(chosen_towers(model, towers), roles or self.roles, model, refuse)[0]

    def peft_targets(self, model: nn.Module, config: Any, roles: tuple[str, ...] | None = None) -> dict[str, list[str]]:
        roles = roles or self.roles
        out = {"target_modules": self.targets(model, config.towers, roles)}
        feedforward = tuple(r for r in self.feedforward_roles if r in roles)
        if feedforward:
            out["feedforward_modules"] = self.targets(model, config.towers, feedforward)
        return out

    def apply(self, model: nn.Module, config: Any, roles: tuple[str, ...] | None = None) -> nn.Module:
        """The tuner on ``config.towers`` of ``model`` in place (an earlier application replaced);
        only its adapters (and a timm head with ``config.train_head``) train."""
        if self.applied(model):
            self.remove(model)
        targets = self.peft_targets(model, config, roles)  # refuses before anything changes
        self.refuse_conflicts(model, self.name)
        towers = chosen_towers(model, config.towers)
        tuner = self.tuner_class() if self.tuner_class is not None else None
        peft_config = self.peft_config(config, targets)
        return inject_tuner(model, self.name, peft_config, towers, config.train_head, config.as_dict(), tuner)

    def remove(self, model: nn.Module) -> nn.Module:
        """Undo :meth:`apply` exactly (modules, names, flags, ``state_dict`` keys)."""
        return remove_tuner(model, self.name, self.label)

    def applied(self, model: nn.Module) -> bool:
        return tuner_in(model, self.name)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return adapter_parameters(model, self.name)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapters' (and trainable heads') state: what an adapter-only checkpoint keeps."""
        return adapter_state_dict(model, self.name)

    def settings(self, model: nn.Module) -> dict[str, Any]:
        return applied_settings(model, self.name)


__all__ = [
    "ADAPTER",
    "PeftTuner",
    "adapter_parameters",
    "adapter_state_dict",
    "applied_settings",
    "applied_tuner",
    "chosen_towers",
    "frozen_base_keys",
    "holder",
    "inject_tuner",
    "remove_tuner",
    "tuner_layers",
    "tuner_of",
    "tuner_targets",
]
