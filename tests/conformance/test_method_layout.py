"""Framework v3's method layout: one folder per method, its Lightning code beside it, and the
method's own code (core, configs, schedules) importing neither Lightning nor vleff's Lightning
layer — so ``vleff.apply_<name>`` works in plain PyTorch, and the Lightning half can change
without touching the method."""

from __future__ import annotations

import subprocess
import sys

import pytest
from repo import ROOT

from vleff.registry import builtin_method_names, get_method

LIGHTNING_MODULES = ("lightning", "lightning.pytorch", "pytorch_lightning", "vleff.lightning", "vleff.callbacks")

#: ``python -c PROBE <lightning modules, comma-separated> <method> ...``: imports each method's own
#: modules in turn, printing after each method the Lightning modules loaded by then, and stops at
#: the first that loaded any
PROBE = """
import importlib, json, pkgutil, sys
for name in sys.argv[2:]:
    package = importlib.import_module(f"vleff.methods.{name}")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "lightning":
            importlib.import_module(f"vleff.methods.{name}.{info.name}")
    loaded = [m for m in sys.argv[1].split(",") if m in sys.modules]
    print(json.dumps([name, loaded]), flush=True)
    if loaded:
        break
"""


@pytest.fixture(scope="module")
def lightning_imports() -> dict[str, list[str]]:
    """Per method, the Lightning modules its own code imports (as seen in a fresh interpreter).

    One interpreter for all methods, not one each (2 s apiece): a method is checked after every
    method before it loaded no Lightning, so the first one that loads any is caught by name, and
    the methods after it are checked again in a new interpreter.
    """
    import json

    todo, found = list(builtin_method_names()), {}
    while todo:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, ",".join(LIGHTNING_MODULES), *todo],
            capture_output=True,
            text=True,
            check=True,
        )
        for line in out.stdout.splitlines():
            name, loaded = json.loads(line)
            found[name] = loaded
        todo = [n for n in todo if n not in found]
    return found


@pytest.mark.parametrize("name", builtin_method_names())
def test_a_methods_own_code_imports_no_lightning(name, lightning_imports):
    assert lightning_imports[name] == [], (
        f"vleff.methods.{name} (without its lightning.py) imports {lightning_imports[name]}"
    )


@pytest.mark.parametrize("name", builtin_method_names())
def test_a_methods_callback_and_mixin_live_beside_it(name):
    method = get_method(name)
    for path in (method.callback, method.mixin):
        assert path.startswith(f"vleff.methods.{name}.lightning."), path
    assert method.load_callback().__module__ == method.load_mixin().__module__ == f"vleff.methods.{name}.lightning"


SHARED_LAYERS = (
    "vleff/lightning",
    "vleff/callbacks",
    "vleff/tokens",
    "vleff/backbones",
    "vleff/side",
    "vleff/registry.py",
    "vleff/checks.py",
)


def _method_names_in_code(path) -> list[str]:
    """String constants in ``path``'s code (docstrings left out) that are a built-in method's name."""
    import ast

    names = set(builtin_method_names())
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        f"{path}:{node.lineno}: {node.value!r}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings
    ]


def test_no_shared_layer_names_a_method():
    """What every method shares (the Lightning base, the facades, tokens, backbones, side machinery,
    the registry) asks the registry entry instead of branching on a method's name, so a new method
    edits no shared module."""

    root = ROOT
    files = [
        p
        for layer in SHARED_LAYERS
        for p in ((root / layer).rglob("*.py") if (root / layer).is_dir() else [root / layer])
    ]
    found = [hit for path in files for hit in _method_names_in_code(path)]
    assert not found, "shared code that names a method:\n" + "\n".join(found)
