"""Old module paths of the methods, kept importable for one release (vleff 0.2 -> 0.3).

Framework v3 moved every method into its own folder (``vleff.tokens.tome`` is now
``vleff.methods.tome.core``). Code that imports an old path gets the *same module object* as the
new path (so monkeypatching and ``isinstance`` keep working) and one ``DeprecationWarning``
naming the new path. The table is the only place old paths are listed; this module imports
nothing heavy and is installed by ``import vleff``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old dotted path -> the module it is now
MOVED: dict[str, str] = {
    "vleff.tokens.tome": "vleff.methods.tome.core",
    "vleff.tokens.visualize": "vleff.methods.tome.visualize",
    "vleff.tokens.schedule": "vleff.methods.tome.schedule",
    "vleff.tokens.dynamicvit": "vleff.methods.dynamicvit.core",
    "vleff.tokens.evit": "vleff.methods.evit.core",
    "vleff.tokens.crossget": "vleff.methods.crossget.core",
    "vleff.tokens.madtp": "vleff.methods.madtp.core",
    "vleff.tokens.madtp_controller": "vleff.methods.madtp.controller",
    "vleff.side.vqt": "vleff.methods.vqt.core",
    "vleff.side.lst": "vleff.methods.lst.core",
    "vleff.side.unipt": "vleff.methods.unipt.core",
    "vleff.side.lora": "vleff.methods.lora.core",
    "vleff.side.memvp": "vleff.methods.memvp.core",
    "vleff.memory.reversible": "vleff.methods.reversible.core",
    "vleff.memory.galore": "vleff.methods.galore.core",
    "vleff.memory.selection": "vleff.methods.galore.selection",
    "vleff.memory.mezo": "vleff.methods.mezo.core",
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path (no second copy of the module)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; the old path goes in vleff 0.3",
                      DeprecationWarning, stacklevel=3)
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module was executed under its new name); the import system has set the
        old path's spec on it, so put its own back (``reload``, pickling and tools read ``__spec__``)."""
        module.__spec__ = self.spec


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
