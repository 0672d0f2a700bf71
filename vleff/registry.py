"""Names of the methods the CLIs and configs can apply (``method=tome`` ...).

Each method module registers itself when imported; :func:`get_method` imports the built-in
ones on demand so the registry never pulls in heavy modules it does not need.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from torch import nn

MethodKind = Literal["tokens", "memory", "side"]


@dataclass(frozen=True)
class Method:
    """A method as the CLIs see it.

    Attributes:
        name: registry key (``"tome"``).
        apply: ``apply(model, **kwargs) -> model`` (in place; returns the model for chaining).
        remove: ``remove(model) -> model`` undoes ``apply``.
        defaults: keyword arguments the benchmark uses when none are given.
        kind: what the method saves (tokens, memory, side networks).
        description: one line for tables and ``--help``.
    """

    name: str
    apply: Callable[..., nn.Module]
    remove: Callable[[nn.Module], nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    kind: MethodKind = "tokens"
    description: str = ""

    def label(self, **kwargs: Any) -> str:
        args = {**self.defaults, **kwargs}
        return self.name + ("(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")" if args else "")


_METHODS: dict[str, Method] = {}
# built-in method name -> module that registers it when imported
_BUILTIN: dict[str, str] = {
    "tome": "vleff.tokens.tome",
    "dynamicvit": "vleff.tokens.dynamicvit",
    "evit": "vleff.tokens.evit",
}


def register_method(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in _METHODS and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError:
            pass
    if name not in _METHODS:
        raise ValueError(f"method={name!r} is not known; available: {', '.join(available_methods())}")
    return _METHODS[name]


def available_methods() -> list[str]:
    names = set(_METHODS)
    for name, module in _BUILTIN.items():
        if importlib.util.find_spec(module) is not None:
            names.add(name)
    return sorted(names)
