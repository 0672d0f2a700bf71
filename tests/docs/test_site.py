"""The documentation site (``mkdocs.yml``, ``docs/``): every registered method has its page, in the
navigation, with its facts read from the registry and the sections a user looks for; and every
code block the docs mark as running (``<!-- runs -->`` on the line before it) runs, page by page
in one namespace like a notebook, on the tiny offline models it uses. ``mkdocs build --strict``
itself (broken links, missing pages, docstring errors) runs in ``scripts/test.sh``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo import ROOT

from vleff.registry import available_methods

DOCS = ROOT / "docs"
#: the sections every method page has, in this order
METHOD_SECTIONS = ("## What it does", "## Paper and official code", "## Use it", "## Measured", "## Limits")
RUNS = re.compile(r"<!--\s*runs\s*-->\s*\n```python\n(.*?)\n```", re.S)


def _nav_paths(items: list) -> list[str]:
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_paths(value) if isinstance(value, list) else [value])
    return out


def _mkdocs_config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.mark.parametrize("name", available_methods())
def test_every_registered_method_has_its_page(name):
    page = DOCS / "methods" / f"{name}.md"
    assert page.exists(), f"no docs/methods/{name}.md for the registered method {name!r}"
    nav = _nav_paths(_mkdocs_config()["nav"])
    assert f"methods/{name}.md" in nav, f"docs/methods/{name}.md is not in mkdocs.yml's nav"
    text = page.read_text()
    assert f"<!-- vleff:method-facts {name} -->" in text, "the page does not include the registry's facts"
    at = [text.find(section + "\n") for section in METHOD_SECTIONS]
    missing = [s for s, i in zip(METHOD_SECTIONS, at) if i < 0]
    assert not missing, f"docs/methods/{name}.md lacks {missing}"
    assert at == sorted(at), f"docs/methods/{name}.md: sections out of order, want {METHOD_SECTIONS}"
    for section, start in zip(METHOD_SECTIONS, at):
        body = text[start + len(section) :].lstrip("\n").split("\n## ", 1)[0]
        assert len(body.split()) >= 15, f"docs/methods/{name}.md: {section!r} is nearly empty"


def _pages_that_run() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if RUNS.search(p.read_text()))


def test_the_docs_have_running_examples():
    pages = {p.relative_to(DOCS).as_posix() for p in _pages_that_run()}
    assert {"methods/tome.md", "getting-started.md"} <= pages, pages


@pytest.mark.parametrize("page", _pages_that_run(), ids=lambda p: p.relative_to(DOCS).as_posix())
def test_marked_code_blocks_run(page, tmp_path, monkeypatch):
    """A page's marked blocks run in order in one fresh namespace (in this process: the imports
    they share are paid once per worker, not once per page)."""
    import contextlib
    import io
    import warnings

    import torch

    blocks = RUNS.findall(page.read_text())
    if any("os.environ[" in b for b in blocks):  # it sets the environment before an import: its own interpreter
        script = tmp_path / "page.py"
        script.write_text("\n\n".join(blocks))
        done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{page.relative_to(ROOT)}: a marked block failed\n{done.stderr[-3000:]}"
        return
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict = {"__name__": "__docs_page__"}
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for i, block in enumerate(blocks, 1):
                try:
                    exec(compile(block, f"{page.relative_to(ROOT)} block {i}", "exec"), namespace)
                except Exception as err:
                    raise AssertionError(f"{page.relative_to(ROOT)}: marked block {i} failed: {err!r}") from err
    finally:
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)


def test_the_readme_is_a_front_door_whose_links_resolve():
    """The README stays short (the site holds the rest) and every relative link in it names a file
    of the repository (GitHub renders it; the strict site build does not read it)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", text)
    local = [t for t in targets if not re.match(r"^[a-z]+:", t)]
    assert local, "no links found"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, missing
    for name in available_methods():  # the methods table links every method's page
        assert f"docs/methods/{name}.md" in text, name


@pytest.mark.parametrize("name", available_methods())
def test_every_setting_of_every_method_is_documented_in_its_config(name):
    """A method page's settings table reads each setting's meaning from its config's ``Attributes:``
    section (scripts/docs_hooks.py): a setting without one shows an empty cell."""
    import dataclasses
    import importlib.util
    import inspect

    from vleff.registry import get_method

    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "scripts" / "docs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    config = get_method(name).config
    documented = hooks._attribute_docs(inspect.getdoc(config) or "")
    settings = [f.name for f in dataclasses.fields(config) if f.init and not f.name.startswith("_")]
    missing = [s for s in settings if not documented.get(s)]
    assert not missing, f"{config.__name__} documents no meaning for {missing} (its Attributes: section)"
