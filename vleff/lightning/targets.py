"""The rules every method callback keeps: which model it acts on, what it does when the method
is already there, and what ``remove_on_teardown`` keeps.

Why one module: a LightningModule often holds more than one model (a frozen teacher beside a
student, an EMA copy, a reference model). A callback that patched "every tower it finds" or
"the first pair it finds" changed models the user never meant (reversible ``meft`` moved a
frozen teacher's outputs), and a callback that silently skipped its settings when the method
was already applied, or that re-applied an untrained method after removing the trained one,
changed its job without a word. The three rules, for every callback that applies a method:

* **Which model** (:func:`resolve_target`): ``module=`` names it, as an attribute path
  (``"student"``, ``"model.backbone"``) or as the module object itself (the LightningModule
  itself means "every model in it"). With ``module=None`` the callback acts on the
  LightningModule when exactly one of its children holds what the method acts on (a tower of
  the kinds ``towers`` names, an image-text pair, a MemVP host); with more than one it refuses
  and lists them.
* **Already applied** (:func:`refuse_other_settings`): when the method is already on the
  target (a mixin, ``vleff.apply_*``, an earlier run), the callback keeps it only if it was
  applied with the callback's settings; otherwise it refuses, naming both. Rebuilding it
  would silently throw its trained state away; skipping the settings would silently ignore
  them. Settings a callback drives itself (ToMe's ``r`` schedule, EViT's ``keep_rate``
  schedule, MADTP's calibrated ``tau``) are not compared.
* **Removal at teardown** (:class:`TeardownRemoval`): ``remove_on_teardown=True`` returns the
  plain model after each run, with every ``requires_grad`` flag as it was before the callback
  froze anything, and keeps the removed method's trained state, so a later
  ``trainer.validate``/``test``/``fit`` with the same callback re-applies the *trained*
  method, not a freshly initialised one.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Any

import torch
from torch import nn

from vleff.checks import check_bool
from vleff.tokens.common import towers_meant

__all__ = [
    "ModuleArg",
    "TeardownRemoval",
    "applied_settings",
    "candidates",
    "check_module_arg",
    "module_at",
    "refuse_other_settings",
    "resolve_backbone",
    "resolve_target",
    "single_backbone",
]

#: what ``module=`` takes: an attribute path, the module object, or ``None`` (find it)
ModuleArg = str | nn.Module | None


def check_module_arg(module: Any) -> str | nn.Module | None:
    """``module=`` as a callback's constructor receives it; a bad value raises ``ValueError``
    naming it and what is allowed (at construction, before any run)."""
    if module is None or isinstance(module, nn.Module):
        return module
    if isinstance(module, str) and module and all(module.split(".")):
        return module
    raise ValueError(
        f"module={module!r} is not allowed; give the attribute path of the model inside the "
        "LightningModule as a dotted string (e.g. 'student' or 'model.backbone'), the model object "
        "itself, or None to use the one model the method applies to"
    )


def module_at(pl_module: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted attribute ``path`` of ``pl_module`` (``ValueError`` naming the
    first part that is missing; ``TypeError`` when the attribute is not a module)."""
    module: Any = pl_module
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(f"module={path!r}: {type(module).__name__} has no attribute {part!r}")
        module = getattr(module, part)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module={path!r} is a {type(module).__name__}, not an nn.Module")
    return module


def _holds(child: nn.Module, method: str, config: Any) -> bool:
    """Whether ``method`` (with ``config``) would act on something inside ``child``."""
    from vleff.registry import get_method

    entry = get_method(method)
    if entry.needs_pair:
        from vleff.backbones import find_pair

        for module in child.modules():
            try:
                find_pair(module)
                return True
            except TypeError:
                continue
        return False
    if entry.holds is not None:
        return entry.holds(child)
    towers = getattr(config, "towers", None)
    if not entry.towers or towers is None:
        return False
    from vleff.backbones import find_towers
    from vleff.tokens.common import tower_modalities

    try:
        found = find_towers(child)
    except TypeError:
        return False
    return any(t.modality in tower_modalities(towers) for t in found)


def candidates(pl_module: nn.Module, method: str, config: Any) -> list[str]:
    """Attribute paths of the models in ``pl_module`` that ``method`` would act on: its direct
    children that hold a tower / pair / host of the method (a plain ``ModuleDict`` /
    ``ModuleList`` / ``Sequential`` child that is the only one is looked into)."""
    prefix, module = "", pl_module
    while True:
        found = [(name, child) for name, child in module.named_children() if _holds(child, method, config)]
        if len(found) == 1 and type(found[0][1]) in (nn.ModuleDict, nn.ModuleList, nn.Sequential):
            prefix, module = f"{prefix}{found[0][0]}.", found[0][1]
            continue
        return [prefix + name for name, _ in found]


def resolve_target(pl_module: nn.Module, module: str | nn.Module | None, method: str, config: Any) -> nn.Module:
    """The module the callback of ``method`` acts on (see the module docstring).

    Raises:
        ValueError: ``module=`` names nothing in ``pl_module``, or ``module=None`` and more than
            one model in ``pl_module`` holds what the method acts on (the message lists them).
    """
    label = method_label(method)
    if isinstance(module, nn.Module):
        if module is pl_module or any(m is module for m in pl_module.modules()):
            return module
        raise ValueError(
            f"module= is a {type(module).__name__} that is not part of {type(pl_module).__name__}; "
            f"pass a submodule of the LightningModule the trainer runs (or its attribute path)"
        )
    if isinstance(module, str):
        return module_at(pl_module, module)
    found = candidates(pl_module, method, config)
    if len(found) > 1:
        raise ValueError(
            f"{label}: {type(pl_module).__name__} holds {len(found)} models it could apply to "
            f"({', '.join(found)}); pass module= one of {', '.join(repr(f) for f in found)} "
            f"(or the LightningModule object itself to apply it to all of them)"
        )
    return pl_module


def resolve_backbone(pl_module: nn.Module, module: str | nn.Module | None, method: str) -> nn.Module:
    """The backbone a callback of ``method`` loads weights into or acts on: the submodule
    ``module`` names (dotted attribute path or the module object, as :func:`resolve_target`
    takes it), or (``module=None``) the single direct child of ``pl_module`` that holds an image
    tower -- the backbone whose ``forward`` gives the logits.

    Shared by DynamicViT (its target) and by ``init_from`` of EViT and the side callbacks
    (:func:`single_backbone`), so it lives here rather than in one method's callback.

    Raises:
        TypeError: no child holds a supported image tower (the message lists the families).
        ValueError: several children hold one (the message lists them; pass ``module=``).
    """
    if isinstance(module, nn.Module):
        return resolve_target(pl_module, module, method, None)
    if module is not None:
        return module_at(pl_module, module)
    from vleff.backbones import find_towers

    found = []
    for name, child in pl_module.named_children():
        try:
            find_towers(child, "image")
        except TypeError:
            continue
        found.append(name)
    if not found:
        from vleff.backbones import SUPPORTED

        raise TypeError(
            f"no child of {type(pl_module).__name__} holds a supported image tower "
            f"(children: {', '.join(n for n, _ in pl_module.named_children()) or 'none'}); "
            f"{method_label(method)} supports: {'; '.join(SUPPORTED)}"
        )
    if len(found) > 1:
        raise ValueError(
            f"cannot tell which submodule of {type(pl_module).__name__} is the backbone: "
            f"{', '.join(found)} each hold an image tower; pass module= one of "
            f"{', '.join(repr(c) for c in found)}"
        )
    return getattr(pl_module, found[0])


def single_backbone(pl_module: nn.Module, method: str) -> nn.Module | None:
    """The one child of ``pl_module`` holding an image tower (:func:`resolve_backbone` with
    ``module=None``), or ``None`` when several do: then ``init_from`` loads into the whole module."""
    try:
        return resolve_backbone(pl_module, None, method)
    except ValueError:
        return None


# --- already applied ---------------------------------------------------------------------------
def applied_settings(method: str, target: nn.Module) -> dict[str, Any]:
    """The settings of ``method`` as applied to ``target``: the method's own reader
    (:meth:`vleff.registry.Method.applied_settings`), so no shared module names a method."""
    from vleff.registry import get_method

    return get_method(method).applied_settings(target)


def method_label(method: str) -> str:
    """How messages name ``method`` (its registry entry's ``display_name``)."""
    from vleff.registry import get_method

    try:
        return get_method(method).display_name
    except ValueError:
        return method


def refuse_other_settings(method: str, target: nn.Module, wanted: Any, driven: tuple[str, ...] = ()) -> None:
    """``ValueError`` when ``method`` is applied to ``target`` with settings other than
    ``wanted`` (a config dataclass), naming both; ``driven`` settings (those the callback sets
    itself, e.g. a schedule) are not compared. Settings given as ``None`` (automatic: LST's
    ``side_heads``, MemVP's ``visual_dim``) compare only when given."""
    applied = applied_settings(method, target)
    fields = {f.name for f in dataclasses.fields(wanted)}
    diffs = []
    for key, have in applied.items():
        if key not in fields or key in driven:
            continue
        want = getattr(wanted, key)
        if key == "towers":
            want_set = towers_meant(target, want)
            if want_set != have:
                diffs.append(
                    (key, "+".join(sorted(have)) or "none", f"{want!r} ({'+'.join(sorted(want_set)) or 'none'})")
                )
            continue
        if want is None and key in ("side_heads", "visual_dim"):
            continue
        if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
            same = list(want) == list(have)
        else:
            same = want == have
        if not same:
            diffs.append((key, repr(have), repr(want)))
    if diffs:
        label = method_label(method)
        applied_text = ", ".join(f"{k}={h}" for k, h, _ in diffs)
        wanted_text = ", ".join(f"{k}={w}" for k, _, w in diffs)
        raise ValueError(
            f"{label} is already applied to {type(target).__name__} with {applied_text}, but the "
            f"callback asks for {wanted_text}. The callback does not rebuild an applied method (its "
            f"trained state would be lost) nor ignore its own settings: give the callback the settings "
            f"the method was applied with, or remove the method first (vleff.remove_all(model))"
        )


# --- remove_on_teardown ------------------------------------------------------------------------
class TeardownRemoval:
    """What a callback with ``remove_on_teardown=True`` keeps between runs.

    Use: :meth:`note_flags` in ``setup`` before the callback applies or freezes anything,
    :meth:`restore` right after the callback applied the method, :meth:`remove` in ``teardown``.
    """

    def __init__(self) -> None:
        self.flags: dict[str, bool] | None = None
        self.saved: dict[str, torch.Tensor] | None = None
        self._owner: weakref.ref[nn.Module] | None = None

    def note_flags(self, target: nn.Module) -> None:
        """Record ``requires_grad`` of every parameter of ``target`` (once per application)."""
        if self.flags is None:
            self.flags = {n: p.requires_grad for n, p in target.named_parameters()}

    def restore(self, target: nn.Module, label: str) -> bool:
        """Load the state the last removal kept into the method just re-applied to ``target``
        (the same module object only); whether it did."""
        saved, owner = self.saved, self._owner() if self._owner is not None else None
        self.saved, self._owner = None, None
        if saved is None or owner is not target:
            return False
        result = target.load_state_dict(saved, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(
                f"{label}: the re-applied method has no {result.unexpected_keys[:3]} of the trained "
                "one removed at teardown; it was applied with other settings in between"
            )
        return True

    def remove(self, method: str, target: nn.Module) -> None:
        """Remove ``method`` from ``target``, keep its state, put the flags back."""
        from vleff.registry import get_method

        before = target.state_dict(keep_vars=True)
        entry = get_method(method)
        assert entry.remove is not None
        entry.remove(target)
        after = set(target.state_dict(keep_vars=True))
        # tensors cloned; a module's extra state (MADTP's τ) is any picklable object: copied
        self.saved = {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in before.items()
            if k not in after
        }
        self._owner = weakref.ref(target)
        if self.flags is not None:
            for name, p in target.named_parameters():
                if name in self.flags:
                    p.requires_grad_(self.flags[name])
        self.flags = None


class RemovalOption:
    """The ``remove_on_teardown`` option of a method callback, written once.

    Use: :meth:`init_removal` in ``__init__``; :meth:`note_removal` first in ``setup`` (the
    ``requires_grad`` flags as they were, whether the callback applies the method or finds it
    applied); :meth:`apply_removable` around the callback's ``apply`` (the trained state of an
    earlier removal loaded after it); :meth:`remove_at_teardown` in ``teardown``. The class
    attribute ``method`` names the registry entry."""

    method: str = ""

    def init_removal(self, remove_on_teardown: bool) -> None:
        self.remove_on_teardown = check_bool("remove_on_teardown", remove_on_teardown)
        self._removal = TeardownRemoval()

    def note_removal(self, target: nn.Module) -> None:
        if self.remove_on_teardown:
            self._removal.note_flags(target)

    def apply_removable(self, target: nn.Module, apply: Any) -> None:
        self.note_removal(target)  # no-op when setup noted them already
        apply()
        if self.remove_on_teardown:
            self._removal.restore(target, method_label(self.method))  # the trained state, if removed earlier

    def apply_or_keep(self, target: nn.Module, config: Any, apply: Any, driven: tuple[str, ...] = ()) -> None:
        """The callback's method on ``target``: kept as it is when already applied with ``config``
        (other settings refused naming both, :func:`refuse_other_settings`; ``driven`` settings are
        the callback's schedule's), else applied by ``apply()`` (:meth:`apply_removable`)."""
        from vleff.registry import get_method

        if get_method(self.method).is_applied(target):
            refuse_other_settings(self.method, target, config, driven=driven)
        else:
            self.apply_removable(target, apply)

    def remove_at_teardown(self, target: nn.Module | None) -> None:
        from vleff.registry import get_method

        entry = get_method(self.method)
        if self.remove_on_teardown and target is not None and entry.is_applied(target):
            self._removal.remove(self.method, target)
