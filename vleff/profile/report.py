"""Show and save measurement rows: a rich table, CSV, JSON and a PNG bar chart.

Rows are plain dicts (as :func:`vleff.profile.compare_models` returns them), so callers can
add columns (``accuracy``...) and pass their names as ``extra_columns``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_COLUMNS", "format_value", "plot_rows", "print_table", "rows_to_csv", "rows_to_json"]

# key -> (header, format)
DEFAULT_COLUMNS: dict[str, tuple[str, str]] = {
    "name": ("model", "{}"),
    "gflops_per_sample": ("GFLOPs/img", "{:.4g}"),
    "flops_ratio": ("FLOPs ratio", "{:.3f}"),
    "images_per_s": ("img/s", "{:.1f}"),
    "speedup": ("speedup", "{:.2f}x"),
    "flop_limit_fraction": ("of FLOP limit", "{:.0%}"),
    "activation_mib": ("act. MiB", "{:.2f}"),
    "accuracy": ("accuracy", "{:.1%}"),
    "accuracy_change": ("Δ acc.", "{:+.1%}"),
}


def format_value(value: Any, fmt: str = "{}") -> str:
    """``value`` formatted with ``fmt``; ``-`` for missing/NaN, plain ``str`` when the format fails."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and fmt == "{}":
        fmt = "{:.4g}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _columns(
    rows: Sequence[dict[str, Any]], extra_columns: Sequence[str] | dict[str, str] | None
) -> list[tuple[str, str, str]]:
    cols = [(k, h, f) for k, (h, f) in DEFAULT_COLUMNS.items() if any(k in r for r in rows)]
    if isinstance(extra_columns, dict):
        cols += [(k, h, "{}") for k, h in extra_columns.items()]
    else:
        cols += [(k, k, "{}") for k in extra_columns or ()]
    return cols


def print_table(
    rows: Sequence[dict[str, Any]],
    title: str | None = "vleff benchmark",
    extra_columns: Sequence[str] | dict[str, str] | None = None,
    console: Any = None,
) -> Any:
    """Print ``rows`` as a rich table and return the ``rich.table.Table``.

    ``extra_columns`` adds keys beyond the defaults: a list of keys, or ``{key: header}``.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    cols = _columns(rows, extra_columns)
    for i, (_, header, _) in enumerate(cols):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(format_value(row.get(k), f) for k, _, f in cols))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: rich would squeeze the table into 80 columns
            console = Console(width=max(console.width, 160))
    console.print(table)
    return table


def _keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return keys


def rows_to_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` as CSV (union of keys as header, missing cells empty); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_keys(rows))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def rows_to_json(rows: Sequence[dict[str, Any]], path: str | Path, **metadata: Any) -> Path:
    """Write ``{"rows": rows, **metadata}`` as JSON (NaN becomes null); returns the path."""

    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {**metadata, "rows": [{k: clean(v) for k, v in row.items()} for row in rows]}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Bar charts of GFLOPs/img, speedup and activation MiB per row, saved as a PNG.

    Uses matplotlib's object API with the Agg canvas: no display needed and pyplot's global
    backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [
        (k, h)
        for k, h in (
            ("gflops_per_sample", "GFLOPs / image"),
            ("speedup", "speedup (x)"),
            ("activation_mib", "activation MiB"),
            ("images_per_s", "images / s"),
        )
        if any(isinstance(r.get(k), (int, float)) for r in rows)
    ][:3]
    if not panels:
        raise ValueError("rows have none of gflops_per_sample, speedup, activation_mib, images_per_s to plot")
    names = [str(r.get("name", i)) for i, r in enumerate(rows)]
    fig = Figure(figsize=(4 * len(panels), 3.2 + 0.1 * max(len(n) for n in names)))
    FigureCanvasAgg(fig)
    colors = ["#7f7f7f"] + ["#1f77b4"] * (len(rows) - 1)  # baseline grey
    for i, (key, header) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [r.get(key) if isinstance(r.get(key), (int, float)) else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        ax.bar_label(bars, labels=[format_value(v, "{:.3g}") for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(header)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
