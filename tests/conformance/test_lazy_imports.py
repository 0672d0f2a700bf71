"""The lazily importing packages (one helper, :mod:`vleff._lazy`): every public name imports,
unknown names raise ``AttributeError`` naming the package, and ``import vleff`` stays light."""

import importlib
import subprocess
import sys

import pytest

import vleff

LAZY_PACKAGES = ["vleff", "vleff.callbacks", "vleff.models", "vleff.data"]


def _table(package: str) -> dict[str, str]:
    module = importlib.import_module(package)
    return getattr(module, "_LAZY", None) or dict(module._EXPORTS)


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_public_name_imports(package):
    module = importlib.import_module(package)
    table = _table(package)
    if hasattr(module, "__all__"):
        assert sorted(module.__all__) == sorted(table)  # __all__ is the whole table
    for name, home in table.items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name)
        imported = __import__(package, fromlist=[name])  # what `from <package> import <name>` runs
        assert getattr(imported, name) is getattr(module, name)


def test_subpackages_are_reachable_as_attributes():
    for name in ("backbones", "callbacks", "data", "kernels", "memory", "models", "profile", "side", "tokens"):
        assert getattr(vleff, name) is importlib.import_module(f"vleff.{name}")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_unknown_name_raises_attribute_error_naming_the_package(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match=rf"module '{package}' has no attribute 'no_such_name'"):
        module.no_such_name  # noqa: B018
    assert not hasattr(module, "no_such_name")


def test_callbacks_error_lists_what_is_available():
    with pytest.raises(AttributeError, match="available: .*TokenMerging"):
        vleff.callbacks.TokenMergin  # noqa: B018


def test_dir_lists_the_lazy_names():
    assert {"apply_tome", "remove_tome", "update", "__version__"} <= set(dir(vleff))
    assert dir(vleff.callbacks) == sorted(vleff.callbacks._EXPORTS)


def test_import_vleff_does_not_load_heavy_modules():
    code = (
        "import sys, vleff, vleff.callbacks, vleff.models, vleff.data; "
        "print(sorted(m for m in ('torch', 'lightning', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
