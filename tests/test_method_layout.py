"""Framework v3's method layout: one folder per method, its Lightning code beside it, and the
method's own code (core, configs, schedules) importing neither Lightning nor vleff's Lightning
layer — so ``vleff.apply_<name>`` works in plain PyTorch, and the Lightning half can change
without touching the method."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vleff.registry import builtin_method_names, get_method

LIGHTNING_MODULES = ("lightning", "lightning.pytorch", "pytorch_lightning", "vleff.lightning", "vleff.callbacks")

PROBE = """
import importlib, pkgutil, sys
import vleff.methods.{name} as package
for info in pkgutil.iter_modules(package.__path__):
    if info.name != "lightning":
        importlib.import_module(f"vleff.methods.{name}.{{info.name}}")
print(",".join(m for m in {modules!r} if m in sys.modules))
"""


@pytest.mark.parametrize("name", builtin_method_names())
def test_a_methods_own_code_imports_no_lightning(name):
    code = PROBE.format(name=name, modules=LIGHTNING_MODULES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"vleff.methods.{name} (without its lightning.py) imports {out}"


@pytest.mark.parametrize("name", builtin_method_names())
def test_a_methods_callback_and_mixin_live_beside_it(name):
    method = get_method(name)
    for path in (method.callback, method.mixin):
        assert path.startswith(f"vleff.methods.{name}.lightning."), path
    assert method.load_callback().__module__ == method.load_mixin().__module__ == f"vleff.methods.{name}.lightning"
