"""Figures the headline-results page (docs/results.md, moved there from the README) quotes are the
committed benchmark output they cite (one owner per number)."""

from __future__ import annotations

import json

from repo import ROOT


def test_madtp_flops_table_follows_its_json():
    rows = json.loads((ROOT / "docs" / "data" / "madtp_flops.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    readme = (ROOT / "docs" / "results.md").read_text()  # the headline tables' home
    assert len(rows) == 6
    for row in rows:
        cells = (
            f"| {row['flops_reduction']} | {row['baseline_gflops']:.2f} | {row['madtp_gflops']:.2f} | "
            f"{row['ratio']:.3f} ({row['target_ratio']:.3f}) | {100 * row['error_vs_target']:.2f} %"
        )
        assert cells in readme, cells
        tokens = f"| {row['image_tokens'][-1]} | {row['text_tokens'][0]}→{row['text_tokens'][1]}"
        assert tokens in readme, tokens


def test_cpu_flop_limit_table_follows_its_json():
    readme = (ROOT / "docs" / "results.md").read_text()  # the headline tables' home
    for name in ("vit_base", "clip_b16"):
        data = json.loads((ROOT / "docs" / "data" / "cpu_flop_limit" / f"{name}.json").read_text())
        for row in data["rows"][1:]:
            cells = f"| {row['flops_ratio']:.3f} | {row['speedup']:.2f}× | {100 * row['flop_limit_fraction']:.0f} % |"
            assert cells in readme, (name, row["name"], cells)
            assert row["flop_limit_fraction"] == row["speedup"] * row["flops_ratio"]
