"""Contract: family knowledge lives only in the adapters (vleff/backbones).

Methods (vleff/methods/**) and the side-method base (vleff/side/**) ask a tower adapter
(:class:`vleff.backbones.base.TowerAdapter`) or a pair adapter (:class:`vleff.backbones.pairs.ModelPair`)
for the model's pieces (classifier head, final norm, projections, block container, attention
projections, LoRA targets); they never branch on which family a model is. This test reads their
source and fails listing every family branch it finds:

* a comparison involving a ``family`` name or attribute (``tower.family == "timm"``, ``family in (...)``);
* a comparison involving a class name (``type(x).__name__ in (...)``, ``x.__class__.__name__ == ...``);
* ``isinstance``/``issubclass`` against a class imported from a model library (timm, open_clip,
  transformers) or against a vleff adapter class (``...Adapter``, ``...Pair``).
"""

from __future__ import annotations

import ast

import pytest
from repo import ROOT

SCANNED = ("vleff/methods", "vleff/side")
FAMILY_MODULES = (
    "timm",
    "open_clip",
    "transformers",
    "vleff.backbones.timm_vit",
    "vleff.backbones.open_clip",
    "vleff.backbones.hf",
    "vleff.backbones.blip_text",
    "vleff.backbones.pairs",
)
#: files still branching on a family, with the reason; each must still branch (the list only shrinks)
PENDING: dict[str, str] = {}


def _family_classes(tree: ast.Module) -> set[str]:
    """Names bound in the module to classes of a model library or to vleff adapter classes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module.split(".")[0] in ("timm", "open_clip", "transformers") or node.module in FAMILY_MODULES)
        ):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vleff"):
            names |= {a.asname or a.name for a in node.names if a.name.endswith(("Adapter", "Pair"))}
    return names


def _names_family(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Attribute) and n.attr == "family") or (isinstance(n, ast.Name) and n.id == "family")
        for n in ast.walk(node)
    )


def _names_class_name(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "__name__" for n in ast.walk(node))


def family_branches(source: str, path: str) -> list[str]:
    """``path:line: what`` for every family branch in ``source``."""
    tree = ast.parse(source)
    classes = _family_classes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if _names_family(node):
                found.append(f"{path}:{node.lineno}: compares a family: {ast.unparse(node)}")
            elif _names_class_name(node):
                found.append(f"{path}:{node.lineno}: compares a class name: {ast.unparse(node)}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("isinstance", "issubclass")
            and len(node.args) == 2
        ):
            hit = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & classes
            hit |= {
                n.attr
                for n in ast.walk(node.args[1])
                if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name)
                and n.value.id in ("timm", "open_clip", "transformers")
            }
            if hit:
                found.append(
                    f"{path}:{node.lineno}: {node.func.id} against a family class "
                    f"({', '.join(sorted(hit))}): {ast.unparse(node)}"
                )
    return found


def _scan() -> dict[str, list[str]]:
    out = {}
    for folder in SCANNED:
        for file in sorted((ROOT / folder).rglob("*.py")):
            rel = file.relative_to(ROOT).as_posix()
            found = family_branches(file.read_text(), rel)
            if found:
                out[rel] = found
    return out


def test_no_family_branch_outside_the_adapters() -> None:
    found = {path: lines for path, lines in _scan().items() if path not in PENDING}
    assert not found, "family branches outside vleff/backbones (ask the tower/pair adapter instead):\n" + "\n".join(
        line for lines in found.values() for line in lines
    )


def test_pending_list_only_shrinks() -> None:
    scanned = _scan()
    stale = [path for path in PENDING if path not in scanned]
    assert not stale, f"no family branch left in {stale}: remove them from PENDING"


@pytest.mark.parametrize(
    "snippet",
    [
        'if tower.family == "timm":\n    pass\n',
        'ok = family in ("open_clip", "transformers")\n',
        'ok = type(root).__name__ in ("CLIPVisionModel",)\n',
        "from timm.models.deit import VisionTransformerDistilled\nok = isinstance(root, VisionTransformerDistilled)\n",
        "from vleff.backbones.hf import HFCLIPAdapter\nok = isinstance(tower, HFCLIPAdapter)\n",
    ],
)
def test_scanner_catches_each_kind(snippet: str) -> None:
    assert family_branches(snippet, "x.py")


def test_scanner_leaves_ordinary_code_alone() -> None:
    src = (
        'from torch import nn\nok = isinstance(m, nn.Linear)\nmsg = f"{type(m).__name__}"\n'
        'ok2 = tower.modality == "image"\n'
    )
    assert family_branches(src, "x.py") == []
