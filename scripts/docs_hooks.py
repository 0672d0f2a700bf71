"""MkDocs hooks of vleff's documentation site (``mkdocs.yml``: ``hooks:``).

Two jobs, both so that the site cannot drift from the code:

* ``<!-- vleff:method-facts NAME -->`` in a page becomes the method's facts read from the
  registry at build time: kind, towers, the callback / mixin / functional entry points, its
  FLOPs knob, what it refuses to share a model with, whether it runs sharded, its settings with
  their defaults and the config's own docstring, and its row of ``docs/fidelity.md``.
* A link from a page to a file of the repository outside ``docs/`` (a benchmark script, a test)
  is checked to exist and written as the path in code, so ``mkdocs build --strict`` still fails
  on a broken one instead of publishing a dead link.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
FACTS = re.compile(r"<!--\s*vleff:method-facts\s+([a-z0-9_]+)\s*-->")
LINK = re.compile(r"(?<!!)\[([^\]\n]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")
KINDS = {
    "tokens": "token reduction (fewer FLOPs at inference, and in training where the method trains)",
    "side": "parameter-efficient tuning (fewer trainable parameters, less training memory)",
    "memory": "training memory (optimizer state, activations)",
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = FACTS.sub(lambda m: method_facts(m.group(1), page.file.src_uri), markdown)
    return LINK.sub(lambda m: _repo_link(m, page, config), markdown)


# --- links to the repository outside docs/ ----------------------------------------------------------
def _repo_link(match: re.Match, page: Any, config: Any) -> str:
    text, target = match.group(1), match.group(2)
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return match.group(0)  # a URL (or an absolute path: mkdocs' own validation reports it)
    docs = Path(config["docs_dir"]).resolve()
    # normalised, not resolved: a link through a symlink (configs/ -> vleff/configs/) keeps its name
    resolved = Path(os.path.normpath(docs / Path(page.file.src_uri).parent / target))
    try:
        resolved.relative_to(docs)
        return match.group(0)  # a page or file of the site: mkdocs validates it
    except ValueError:
        pass
    try:
        rel = resolved.relative_to(ROOT)
    except ValueError:
        raise PluginError(f"{page.file.src_uri}: link {target!r} leaves the repository") from None
    if not resolved.exists():
        raise PluginError(f"{page.file.src_uri}: link {target!r} names {rel}, which does not exist")
    shown = f"`{rel.as_posix()}`"
    return shown if text.strip("`") == rel.as_posix() or text == shown else f"{text} ({shown})"


# --- a method's facts from the registry ---------------------------------------------------------------
def method_facts(name: str, where: str) -> str:
    from vleff.registry import available_methods, get_method

    if name not in available_methods():
        raise PluginError(f"{where}: vleff:method-facts names {name!r}, not a registered method")
    m = get_method(name)
    lines = ["| | |", "|---|---|"]
    lines.append(f"| kind | {KINDS.get(m.kind, m.kind)} |")
    if m.towers:
        towers = ", ".join(m.towers)
    elif m.kind == "memory":
        towers = "none: it acts on the optimizer / training step"
    else:
        towers = "none of its own: see *Use it* for the model it acts on"
    lines.append(f"| towers | {towers} |")
    if m.callback:
        lines.append(f"| callback | `{_public(m.callback)}` |")
    if m.mixin:
        lines.append(f"| mixin | `{_public(m.mixin)}` |")
    if m.apply is not None:
        lines.append(f"| functional | {_functional(m)} |")
    if m.updatable:
        changes = ", ".join(f"`{u}`" for u in m.updatable)
        lines.append(f"| `vleff.update(model, {name!r}, ...)` may change | {changes} |")
    if m.budget is not None:
        lines.append(
            f"| FLOPs budget | `vleff.fit_budget(model, batches, flops=...)` or the callback's `flops_target=` "
            f"set `{m.budget.setting}` |"
        )
    if m.unsharded:
        sharded = "refused: " + _cell(m.unsharded)
    elif m.needs_dtensor:
        sharded = "runs under FSDP2 (`ModelParallelStrategy`); refused under FSDP1 and DeepSpeed: "
        sharded += _cell(m.needs_dtensor)
    else:
        sharded = "runs"
    lines.append(f"| sharded training (FSDP) | {sharded} |")
    out = ["## Facts", "", "Read from the method's registry entry when this page was built.", "", *lines, ""]
    if m.refuses:
        out += ["**Refuses to share a model with** a method that:", ""]
        out += [f"* {_trait(r.trait)}: {r.reason}" for r in m.refuses]
        out.append("")
    out += _settings(m)
    if m.callback:
        out += [
            "### The callback",
            "",
            f"::: {m.callback}",
            "    options:",
            "      heading_level: 4",
            "      members: false",
            "      show_root_full_path: false",
            "",
        ]
    out += _fidelity(m)
    return "\n".join(out)


def _public(path: str) -> str:
    """``vleff.callbacks.X`` when the callbacks module re-exports ``X``, else the path as given."""
    module, _, attr = path.rpartition(".")
    import importlib

    for public in ("vleff.callbacks", "vleff"):
        if getattr(importlib.import_module(public), attr, None) is not None:
            return f"{public}.{attr}"
    return path


def _functional(m: Any) -> str:
    """``vleff.apply_<name>`` / ``vleff.remove_<name>``: ``vleff`` exposes both for every registered
    method with a model surgery (read from the registry, whatever the functions are called)."""
    return f"`vleff.apply_{m.name}` / `vleff.remove_{m.name}`"


def _trait(trait: str) -> str:
    from vleff.registry import TRAITS

    return f"`{trait}` ({TRAITS[trait]})" if trait in TRAITS else f"`{trait}`"


def _cell(text: str) -> str:
    """One table cell of docstring text: reST literals and roles as Markdown code, pipes escaped."""
    text = re.sub(r":(?:func|class|meth|mod|attr|data):`~?([^`]+)`", r"`\1`", " ".join(text.split()))
    return text.replace("``", "`").replace("|", "\\|")


def _settings(m: Any) -> list[str]:
    docs = _attribute_docs(inspect.getdoc(m.config) or "")
    rows = []
    for f in dataclasses.fields(m.config):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        rows.append(f"| `{f.name}` | `{_cell(default)}` | {_cell(docs.get(f.name, ''))} |")
    if not rows:
        return []
    head = [
        f"### Settings (`{m.config.__module__}.{m.config.__name__}`)",
        "",
        "The same names in the callback, the mixin, the functional API and the Hydra config; bad values "
        "are refused naming the setting and what is allowed.",
        "",
        "| setting | default | meaning |",
        "|---|---|---|",
    ]
    return [*head, *rows, ""]


def _attribute_docs(doc: str) -> dict[str, str]:
    """``name -> text`` of a Google-style ``Attributes:`` section."""
    out: dict[str, str] = {}
    section = re.split(r"^Attributes:\s*$", doc, maxsplit=1, flags=re.M)
    if len(section) < 2:
        return out
    current: list[str] = []
    for line in section[1].splitlines():
        if line and not line.startswith(" "):
            break  # the next section
        # "name: text", or several settings documented together: "beta1, beta2: text"
        item = re.match(r"^    ([A-Za-z_]\w*(?:, [A-Za-z_]\w*)*)(?: \([^)]*\))?:\s*(.*)$", line)
        if item:
            current = item.group(1).split(", ")
            for name in current:
                out[name] = item.group(2)
        elif current and line.strip():
            for name in current:
                out[name] += " " + line.strip()
    return out


def _row_names(cell: str) -> list[str]:
    """The method names a fidelity row's first cell lists: ``"LST, UniPT, VQT (all side methods)"``,
    ``"Child-Tuning_F / _D"`` (a suffix shares the name before it)."""
    names: list[str] = []
    for part in re.split(r",|/", cell.strip().strip("*")):
        part = part.strip()
        if part.startswith("_") and names:
            part = names[-1].rsplit("_", 1)[0] + part
        if part:
            names.append(part)
    return names


def _names(listed: str, m: Any) -> bool:
    """Whether a name a row lists is ``m``'s: exactly, or followed by what it says of it
    (``"GaLore (fused kernel)"``, ``"Reversible blocks"``, ``"VPT-deep"``)."""
    own = (m.display_name, m.name)
    return listed in own or any(listed.startswith(f"{n} ") or listed.startswith(f"{n}-") for n in own)


def _fidelity(m: Any) -> list[str]:
    """The method's row of the table in docs/fidelity.md (first cell = its display name)."""
    text = (ROOT / "docs" / "fidelity.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    if len(table) < 3:
        return []
    header = table[0]
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if any(_names(n, m) for n in _row_names(cells[0] if cells else "")):
            return [
                "### Fidelity (row of [the fidelity table](../fidelity.md))",
                "",
                header,
                table[1],
                line.replace("](#", "](../fidelity.md#"),  # the row's own anchors are on that page
                "",
            ]
    return []
