"""One lazy-import helper for the packages whose public names live in heavy submodules.

``import vleff`` (and ``vleff.callbacks``, ``vleff.models``, ``vleff.data``) must stay cheap:
Lightning, timm and the model code load only when a name from them is first used. Each of these
packages keeps a table ``{public name: defining module}`` and gets its module-level
``__getattr__`` (PEP 562) from :func:`lazy_getattr`, so the lookup and its error message are
written once instead of once per package. This module imports nothing heavy.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_getattr(
    package: str, table: Mapping[str, str], submodules: Iterable[str] = (), list_available: bool = False
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``.

    Args:
        package: the package's dotted name (``"vleff.callbacks"``), used for submodules and errors.
        table: public name -> the module that defines it; the name is imported from there on first use.
        submodules: names of subpackages returned as modules (``vleff.tokens`` ...).
        list_available: name every public name in the ``AttributeError`` (for packages whose
            names users type by hand, e.g. the callbacks).
    """
    subs = frozenset(submodules)

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        if name in subs:
            return importlib.import_module(f"{package}.{name}")
        hint = f"; available: {', '.join(sorted(table))}" if list_available else ""
        raise AttributeError(f"module {package!r} has no attribute {name!r}{hint}")

    return __getattr__
