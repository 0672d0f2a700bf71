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


def test_readme_method_table_quotes_the_committed_runs():
    """The README's one-line figures are the committed rows they summarise (one owner per number):
    the CPU FLOP-limit runs and MuE's Digits-CLIP runs with the contrastive exit loss."""
    import statistics

    readme = (ROOT / "README.md").read_text()
    rows = {}
    for name in ("vit_base", "clip_b16"):
        data = json.loads((ROOT / "docs" / "data" / "cpu_flop_limit" / f"{name}.json").read_text())
        rows.update({(name, r["name"].split("(")[0]): r for r in data["rows"]})
    tome = rows[("vit_base", "tome")]
    quoted = [
        f"{tome['flops_ratio']:.3f}× FLOPs, {tome['speedup']:.2f}× img/s ({100 * tome['flop_limit_fraction']:.0f} %",
    ]
    for key in (("vit_base", "evit"), ("vit_base", "dynamicvit")):
        quoted.append(f"{rows[key]['flops_ratio']:.3f}× FLOPs, {rows[key]['speedup']:.2f}× img/s")
    for key in (("clip_b16", "crossget"), ("clip_b16", "madtp")):
        quoted.append(f"image path: {rows[key]['flops_ratio']:.3f}× FLOPs, {rows[key]['speedup']:.2f}×")
    deltas = []
    for seed in (0, 1, 2):
        data = json.loads(
            (ROOT / "docs" / "data" / "clip_digits_budget" / f"seed{seed}_mue_contrastive.json").read_text()
        )
        run = {row["run"]: row["i2t_R@1"] for row in data["rows"]}
        tuned = next(v for k, v in run.items() if k.startswith("MuE (flops_target="))
        control = next(v for k, v in run.items() if k.startswith("baseline + "))
        deltas.append(100 * (tuned - control))
    quoted.append("Digits-CLIP at 0.584×: " + f"{statistics.mean(deltas):.2f}".replace("-", "−"))
    for text in quoted:
        assert text in readme, text
