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
    # the Lightning half: shared code in vleff.lightning, each method's beside the method
    "vleff.callbacks.targets": "vleff.lightning.targets",
    "vleff.callbacks.init_weights": "vleff.lightning.init_weights",
    "vleff.callbacks.restore": "vleff.lightning.restore",
    "vleff.callbacks.schedulers": "vleff.lightning.schedulers",
    "vleff.callbacks.optimizer_swap": "vleff.lightning.optimizer_swap",
    "vleff.callbacks.aux_loss": "vleff.lightning.aux_loss",
    "vleff.callbacks.mixins.base": "vleff.lightning.mixin",
    "vleff.callbacks.token_merging": "vleff.methods.tome.lightning",
    "vleff.callbacks.evit": "vleff.methods.evit.lightning",
    "vleff.callbacks.dynamicvit": "vleff.methods.dynamicvit.lightning",
    "vleff.callbacks.crossget": "vleff.methods.crossget.lightning",
    "vleff.callbacks.madtp": "vleff.methods.madtp.lightning",
    "vleff.callbacks.galore": "vleff.methods.galore.lightning",
    "vleff.callbacks.mezo": "vleff.methods.mezo.lightning",
    "vleff.callbacks.reversible": "vleff.methods.reversible.lightning",
    "vleff.callbacks.vqt": "vleff.methods.vqt.lightning",
    "vleff.callbacks.memvp": "vleff.methods.memvp.lightning",
    "vleff.callbacks.lora": "vleff.methods.lora.lightning",
    # benchmark programs out of the meters' package (profile/ holds only meters)
    "vleff.profile.kernels_bench": "vleff.cli.kernels_bench",
    "vleff.profile.training_memory": "vleff.cli.training_memory",
}

#: old modules whose names went to several new homes: old path -> {name: new module}; a name not
#: listed is looked up in the ``"*"`` module
SPLIT: dict[str, dict[str, str]] = {
    "vleff.callbacks.side": {
        "LadderSideTuning": "vleff.methods.lst.lightning",
        "UniPT": "vleff.methods.unipt.lightning",
        "*": "vleff.lightning.side",
    },
    "vleff.callbacks.mixins.tokens": {
        "TOME_KEY": "vleff.methods.tome.lightning",
        "EVIT_KEY": "vleff.methods.evit.lightning",
        "TEACHER_KEY": "vleff.methods.dynamicvit.lightning",
        "*": "vleff.callbacks.mixins",
    },
    "vleff.callbacks.mixins.side": {"*": "vleff.callbacks.mixins"},
    "vleff.callbacks.mixins.memory": {"*": "vleff.callbacks.mixins"},
    "vleff.memory.convert": {
        "galore_from_optimizer": "vleff.methods.galore.convert",
        "mezo_from_optimizer": "vleff.methods.mezo.convert",
        "*": "vleff.optim",
    },
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path (no second copy of the module)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path goes in vleff 0.3", DeprecationWarning, stacklevel=3
        )
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run (the module was executed under its new name); the import system has set the
        old path's spec on it, so put its own back (``reload``, pickling and tools read ``__spec__``)."""
        module.__spec__ = self.spec


class _Split(importlib.abc.Loader):
    """Loads an old path whose names now live in several modules: a small module that finds each
    name in its new home on first use (one ``DeprecationWarning`` naming the homes)."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        homes = sorted(set(self.table.values()))
        warnings.warn(
            f"{spec.name} was split into {', '.join(homes)}; the old path goes in vleff 0.3",
            DeprecationWarning,
            stacklevel=3,
        )
        module = ModuleType(spec.name)
        table = self.table

        def __getattr__(name: str) -> object:
            return getattr(importlib.import_module(table.get(name, table["*"])), name)

        module.__getattr__ = __getattr__  # type: ignore[method-assign]
        return module

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: every name is looked up in its new home."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in SPLIT:
            return importlib.machinery.ModuleSpec(fullname, _Split(SPLIT[fullname]))
        new = MOVED.get(fullname)
        return None if new is None else importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
