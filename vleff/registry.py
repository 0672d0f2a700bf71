"""The method contract: one registry entry names everything a method is.

Every method is

* a validated **config dataclass** (:class:`MethodConfig` subclass): its defaults live there
  and nowhere else; a bad value raises ``ValueError`` naming the field, the value and what
  is allowed, when the config is built (so a callback fails in its constructor);
* ``apply(model, **settings)`` / ``remove(model)`` (surgery through the backbone adapters),
  and ``update(model, **changes)`` for settings that change on an applied model (schedules);
* one Lightning callback and one mixin (named by import path, so this module and the method
  layer never import Lightning);
* the towers it supports and its kind (``tokens``: fewer tokens; ``side``: a small module
  beside a frozen backbone; ``memory``: less training memory).

:func:`update` (``vleff.update(model, "tome", r=8)``) dispatches to the method's ``update``.
The conformance suite (``tests/conformance/test_conformance.py``) runs every registered method through the same
checks; a registered method with no settings row there fails the suite.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from torch import nn

from vleff.backbones.patch import set_method_conflict_rule

MethodKind = Literal["tokens", "memory", "side"]

#: what a method does to a model, the words conflict rules are written in (one place; a method
#: declares its traits and the traits it refuses, never the names of other methods)
TRAITS: dict[str, str] = {
    "tower_hook": "runs code inside each block of a tower through a TowerHook",
    "reduces_tokens": "changes the number of tokens a tower's blocks see",
    "exits_samples": "lets samples skip a tower's remaining blocks (early exit: a block runs on part of the batch)",
    "owns_tokens": "decides every token reduction of the towers it acts on (cross-modal guidance)",
    "reads_full_stream": "reads every block's output of the full-length frozen token stream",
    "runs_blocks": "runs a tower's blocks itself, so tower hooks do not run",
    "wraps_projections": "wraps the attention projections in new modules (peft adapters)",
    "replaces_optimizer": "replaces the optimizer the module's configure_optimizers returns",
    "selects_parameters": "chooses which backbone parameters (or entries) train: requires_grad flags or gradient masks",
    "peft_tuner": "a Hugging Face peft tuner on the towers' projections (vleff.apply_peft(method=...) reaches it)",
}


@dataclass(frozen=True)
class Refusal:
    """A conflict rule: a method refuses any method with ``trait`` on the same model.

    Attributes:
        trait: a key of :data:`TRAITS`.
        reason: the end of the error message ("cannot apply a while b is applied: <reason>").
        families: only on towers of these families (empty: every family), for conflicts that come
            from one library's layout (peft's adapters on open_clip's fused ``in_proj_weight``).
    """

    trait: str
    reason: str
    families: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.trait not in TRAITS:
            raise ValueError(f"Refusal: trait={self.trait!r} is not known; use one of {', '.join(TRAITS)}")


@dataclass
class MethodConfig:
    """Base of every method's settings. Subclasses validate in ``__post_init__``."""

    #: the registry name of the method this config belongs to
    method: ClassVar[str] = ""

    def replace(self, **changes: Any) -> MethodConfig:
        """A validated copy with ``changes`` (unknown names raise ``TypeError`` listing the fields)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no setting(s) {sorted(unknown)}; "
                f"settings: {[f.name for f in dataclasses.fields(self)]}"
            )
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def build(cls, config: MethodConfig | None = None, **settings: Any) -> MethodConfig:
        """``config`` updated with ``settings``, or a new config from ``settings``."""
        if config is not None:
            if not isinstance(config, cls):
                raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
            return config.replace(**settings) if settings else config
        unknown = set(settings) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(
                f"{cls.method or cls.__name__} has no setting(s) {sorted(unknown)}; "
                f"settings: {[f.name for f in dataclasses.fields(cls)]}"
            )
        return cls(**settings)


@dataclass(frozen=True)
class Budget:
    """How :func:`vleff.fit_budget` drives a method's FLOPs: one knob, from no reduction to the most.

    Attributes:
        setting: what messages name the knob by (``"r"``, ``"keep_rate"``).
        settings: ``settings(model, knob) -> dict``: the settings ``update`` gets for a knob value
            on this model (an int level for a discrete knob, a float in [0, 1] otherwise); more
            knob means fewer FLOPs.
        levels: ``levels(model) -> int``: a discrete knob's largest level on this model (levels
            ``0..levels``); ``None``: a continuous knob in [0, 1].
        fit: ``fit(model, batches, flops, forward, max_evals) -> dict`` for a method with its own
            FLOPs controller (MADTP's τ search); it sets the method and returns its settings.
        steps: ``steps(model, batches, forward) -> list[dict]`` for a knob whose effective values
            depend on the data (a threshold on a score: only the scores the batches produce matter):
            the settings of each step, from no reduction to the most, found on ``batches``; the
            search then bisects over their indices like a discrete knob's levels. The method must be
            left as it was.
        data_dependent: the FLOPs a setting gives move with the model's weights (a threshold on
            learned scores): a callback's ``flops_target`` fits the knob again when training ends.
        snapshot: ``snapshot(model) -> restore`` for a method whose ``fit`` changes more than its
            settings (MADTP's controller also moves its first pruning block and marks τ chosen):
            ``restore()`` puts all of it back when a strict fit fails. ``None``: the settings
            ``applied_settings`` reports are the whole state, and ``update`` restores them.
    """

    setting: str
    settings: Callable[[nn.Module, Any], dict[str, Any]] | None = None
    levels: Callable[[nn.Module], int] | None = None
    fit: Callable[..., dict[str, Any]] | None = None
    steps: Callable[..., list[dict[str, Any]]] | None = None
    data_dependent: bool = False
    snapshot: Callable[[nn.Module], Callable[[], None]] | None = None


@dataclass(frozen=True)
class Method:
    """A registry entry.

    Attributes:
        name: registry key (``"tome"``), also the name of the method's hooks.
        kind: what the method saves.
        config: the config dataclass (defaults, validation).
        apply: ``apply(model, config=None, **settings) -> model`` (in place).
        remove: ``remove(model) -> model``; raises ``ValueError`` when not applied.
        update: ``update(model, **changes)`` on an applied model, or ``None``.
        is_applied: ``is_applied(model) -> bool``.
        callback: import path of the Lightning callback (``"vleff.callbacks.TokenMerging"``).
        mixin: import path of the LightningModule mixin.
        towers: towers the method can act on (``"image"``, ``"text"``), or ``()`` for methods
            that act on the optimizer / training step rather than on towers.
        bench_settings: settings the benchmark CLIs use when none are given.
        description: one line for tables and ``--help``.
        needs_pair: the method acts on both towers of an image-text model at once (CrossGET,
            MADTP): ``vleff-bench`` then builds the whole model and measures its image path.
        traits: what the method does to a model (keys of :data:`TRAITS`); other methods' rules
            refer to these, never to method names.
        refuses: conflict rules (:class:`Refusal`): the traits this method cannot share a model
            with. :func:`conflict` asks both methods, so a rule is written once, on either side.
        updatable: the settings ``update`` may change on an applied model (``vleff.update`` refuses
            the rest with the list).
        required_on_load: the method adds parameters, so it must be applied again before a
            checkpoint's weights load (``restore_methods``, the callbacks' ``on_load_checkpoint``).
        schedule: the setting a schedule drives (ToMe's ``r``), or ``None``.
        unsharded: why the method cannot train sharded parameters (FSDP, DeepSpeed ZeRO-3,
            ``ModelParallelStrategy``), the end of the error its callback raises under such a
            strategy at ``setup``; empty: it runs sharded (``tests/lightning/test_fsdp.py``).
        needs_dtensor: why the method trains sharded parameters only as FSDP2 keeps them (each a
            ``DTensor`` that knows its place in the whole: ``ModelParallelStrategy``) and not
            flattened into shards (``FSDPStrategy``, DeepSpeed, XLA's FSDP), which its callback then
            refuses at ``setup`` with this reason; empty: no such limit.
        display_name: how messages name the method (``"ToMe"``; default: ``name``).
        settings_of: ``settings_of(model) -> dict``: the settings as applied, read back from the
            model (``towers``: the set of modalities carrying it); settings that leave no trace
            once applied are not listed. Default, for tower-hook methods: the hooks' config.
        holds: ``holds(module) -> bool``: whether ``module`` holds something the method acts on
            (which model of a LightningModule a callback picks). Default: a tower of ``towers``
            (an image-text pair for ``needs_pair`` methods).
        reapply_settings: ``reapply_settings(settings) -> settings``: the settings to apply the
            method again with before a checkpoint's trained weights load (``restore_methods``),
            for a setting whose work the weights make moot (LST's data-driven ``init``). Default: as saved.
        budget: how :func:`vleff.fit_budget` sets the method's FLOPs (:class:`Budget`), or ``None``
            for a method that does not reduce FLOPs by a setting.
        calibrate: ``calibrate(model, inputs, tower)`` for a method whose setting is a target
            reached by measuring (MADTP's τ for a FLOPs reduction); ``vleff-bench`` runs it after
            ``apply`` on the batch it measures (images, or caption ids for ``tower="text"``), so
            the figure is of the target, not of a default τ.
    """

    name: str
    kind: MethodKind
    config: type[MethodConfig]
    apply: Callable[..., nn.Module] | None
    remove: Callable[[nn.Module], nn.Module] | None
    update: Callable[..., None] | None = None
    is_applied: Callable[[nn.Module], bool] | None = None
    callback: str = ""
    mixin: str = ""
    towers: tuple[str, ...] = ("image",)
    bench_settings: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    needs_pair: bool = False
    calibrate: Callable[[nn.Module, Any, str], Any] | None = None
    budget: Budget | None = None
    traits: frozenset[str] = frozenset()
    refuses: tuple[Refusal, ...] = ()
    updatable: tuple[str, ...] = ()
    required_on_load: bool = False
    unsharded: str = ""
    needs_dtensor: str = ""
    schedule: str | None = None
    display_name: str = ""
    settings_of: Callable[[nn.Module], dict[str, Any]] | None = None
    holds: Callable[[nn.Module], bool] | None = None
    reapply_settings: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if not self.display_name:
            object.__setattr__(self, "display_name", self.name)
        unknown = set(self.traits) - set(TRAITS)
        if unknown:
            raise ValueError(f"method {self.name!r}: traits {sorted(unknown)} are not known; use {', '.join(TRAITS)}")
        fields = {f.name for f in dataclasses.fields(self.config)}
        for what, names in (("updatable", self.updatable), ("schedule", (self.schedule,) if self.schedule else ())):
            if set(names) - fields:
                raise ValueError(
                    f"method {self.name!r}: {what} names {sorted(set(names) - fields)}, which are "
                    f"not settings of {self.config.__name__}"
                )
        if self.updatable and self.update is None:
            raise ValueError(f"method {self.name!r} declares updatable settings but no update function")

    def refusal_of(self, other: Method, family: str | None = None) -> Refusal | None:
        """This method's rule that refuses ``other`` on a tower of ``family`` (one direction)."""
        for rule in self.refuses:
            if rule.trait in other.traits and (not rule.families or family is None or family in rule.families):
                return rule
        return None

    def applied_settings(self, model: nn.Module) -> dict[str, Any]:
        """The method's settings as applied to ``model`` (``{}`` when it is not applied)."""
        if self.settings_of is not None:
            return self.settings_of(model)
        if "tower_hook" in self.traits:
            from vleff.tokens.common import hook_settings

            return hook_settings(model, self.name)
        return {}

    def label(self, **settings: Any) -> str:
        args = {**self.bench_settings, **settings}
        return self.name + ("(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")" if args else "")

    def check_settings(self, **settings: Any) -> MethodConfig:
        """The validated config for ``settings`` (errors name the bad setting)."""
        return self.config.build(**settings)

    def load_callback(self) -> type:
        return _load(self.callback)

    def load_mixin(self) -> type:
        return _load(self.mixin)


def _load(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


_METHODS: dict[str, Method] = {}
#: the package whose subpackages are the built-in methods, one folder each
METHODS_PACKAGE = "vleff.methods"


def builtin_method_names() -> list[str]:
    """The built-in methods, found by their folders (``vleff/methods/<name>/``) without importing them."""
    import pkgutil

    package = importlib.import_module(METHODS_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.ispkg and not m.name.startswith("_"))


def register_method(method: Method) -> Method:
    if method.config.method != method.name:
        raise ValueError(f"{method.config.__name__}.method is {method.config.method!r}, not {method.name!r}")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the known ones otherwise.

    A built-in method whose module fails to import (a missing third-party dependency) raises
    that ``ImportError``, not "not known".
    """
    if name not in _METHODS and name in builtin_method_names():
        importlib.import_module(f"{METHODS_PACKAGE}.{name}")
    if name not in _METHODS:
        raise ValueError(f"method={name!r} is not known; available: {', '.join(available_methods())}")
    return _METHODS[name]


def available_methods(kind: MethodKind | None = None) -> list[str]:
    names = sorted(set(_METHODS) | set(builtin_method_names()))
    if kind is None:
        return names
    return [n for n in names if get_method(n).kind == kind]


def all_methods() -> list[Method]:
    """Every built-in and registered method (imports the built-in method modules)."""
    return [get_method(n) for n in available_methods()]


def update(model: nn.Module, name: str, **changes: Any) -> None:
    """Change settings of method ``name`` applied to ``model`` without re-applying it
    (``vleff.update(model, "tome", r=8)``, ``vleff.update(model, "evit", keep_rate=0.9)``)."""
    method = get_method(name)
    if method.update is None:
        raise ValueError(f"method {name!r} has no settings that change on an applied model; apply it again")
    fixed = sorted(set(changes) - set(method.updatable))
    if fixed:
        raise ValueError(
            f"{name}: setting(s) {fixed} cannot change on an applied model; update may change "
            f"{', '.join(method.updatable)}; apply {name} again for the others"
        )
    method.update(model, **changes)


def conflict(a: str, b: str, family: str | None = None) -> str | None:
    """Why methods ``a`` and ``b`` cannot be applied to one model (on a tower of ``family``), or
    ``None``: the first rule of either method that matches the other's traits."""
    first, second = get_method(a), get_method(b)
    rule = first.refusal_of(second, family) or second.refusal_of(first, family)
    return None if rule is None else rule.reason


def _hook_conflict(a: str, b: str, family: str) -> str | None:
    """:func:`conflict` for two hooks on a tower; hooks that are no registered method (a user's,
    a teacher's capture) follow no rule here."""
    try:
        return conflict(a, b, family)
    except ValueError:
        return None


set_method_conflict_rule(_hook_conflict)


def refuse_applied_conflicts(model: nn.Module, name: str) -> None:
    """``ValueError`` when a method applied to ``model`` conflicts with method ``name`` by either
    one's declared rules, on any of the model's tower families: for methods that act on the model
    as a whole (side networks), checked before anything changes. Tower hooks are also checked per
    tower when attached (:func:`vleff.backbones.patch.check_attachable`)."""
    from vleff.backbones import find_towers

    families = sorted({tower.family for tower in find_towers(model)}) or [None]
    for other in applied_methods(model):
        if other == name:
            continue
        reason = next((r for r in (conflict(name, other, f) for f in families) if r), None)
        if reason:
            raise ValueError(
                f"cannot apply {name} while {other} is applied to this {type(model).__name__}: {reason}; "
                f"remove {other} first"
            )


def remove_all(model: nn.Module) -> nn.Module:
    """Remove every registered method applied to ``model`` through its own ``remove``."""
    for method in all_methods():
        if method.is_applied is not None and method.is_applied(model):
            assert method.remove is not None
            method.remove(model)
    return model


def applied_methods(model: nn.Module) -> list[str]:
    """Names of the registered methods applied to ``model``."""
    return [m.name for m in all_methods() if m.is_applied is not None and m.is_applied(model)]


def peft_methods() -> list[str]:
    """The registered methods that are ``peft`` tuners (trait ``peft_tuner``): what
    :func:`apply_peft` takes as ``method``."""
    return [m.name for m in all_methods() if "peft_tuner" in m.traits]


def apply_peft(model: nn.Module, method: str, **settings: Any) -> nn.Module:
    """Apply the ``peft`` tuner ``method`` (any of :func:`peft_methods`: LoRA, DoRA, IA3, AdaLoRA,
    LoHa, LoKr, OFT, QLoRA, LoRAHub ..., every entry with the trait ``peft_tuner``) to
    ``model`` with ``settings`` (``towers=...`` and the method's own): the method's registry entry's
    ``apply``, so ``vleff.apply_peft(model, method="dora", r=4)`` is ``vleff.apply_dora(model, r=4)``.
    ``ValueError`` naming the value and the tuners when ``method`` is not one."""
    tuners = peft_methods()
    if method not in tuners:
        raise ValueError(f"method={method!r} is not a peft tuner vleff offers; use one of {', '.join(tuners)}")
    entry = get_method(method)
    assert entry.apply is not None
    return entry.apply(model, **settings)


def remove_peft(model: nn.Module) -> nn.Module:
    """Remove whichever ``peft`` tuner method is applied to ``model`` (``ValueError`` when none is)."""
    applied = [n for n in peft_methods() if get_method(n).is_applied(model)]
    if not applied:
        raise ValueError(f"no peft tuner ({', '.join(peft_methods())}) is applied to this {type(model).__name__}")
    for name in applied:
        entry = get_method(name)
        assert entry.remove is not None
        entry.remove(model)
    return model
