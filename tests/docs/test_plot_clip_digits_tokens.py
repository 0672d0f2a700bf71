"""benchmarks/plot_clip_digits_tokens.py: runs of one seed joined, each point relative to its own
seed's baseline, mismatched baselines refused, and the committed data equal to the README's
Digits-CLIP table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from repo import ROOT

DATA = ROOT / "docs" / "data" / "clip_digits_tokens"


@pytest.fixture(scope="module")
def plotter():
    spec = importlib.util.spec_from_file_location(
        "plot_clip_digits_tokens", ROOT / "benchmarks" / "plot_clip_digits_tokens.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, seed: int | None, rows: list[tuple[str, float, float]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "benchmark": "clip_digits_tokens",
                "overrides": [] if seed is None else [f"seed={seed}"],
                "rows": [{"run": run, "i2t_R@1": r1, "image_flops_ratio": ratio} for run, r1, ratio in rows],
            }
        )
    )
    return path


def test_points_are_relative_to_their_own_seeds_baseline(plotter, tmp_path):
    files = [
        _write(
            tmp_path / "a.json",
            None,
            [
                ("baseline (10 epochs)", 0.90, 1.0),
                ("MADTP towers=image, off the shelf (random codebook)", 0.85, 0.57),
                ("MADTP towers=image, fine-tuned 10 epochs", 0.895, 0.58),
            ],
        ),
        _write(
            tmp_path / "b.json",
            0,
            [
                ("baseline (10 epochs)", 0.90, 1.0),  # seed 0 again: joined
                ("CrossGET r_image=10 r_text=0, fine-tuned 10 epochs", 0.91, 0.568),
            ],
        ),
        _write(
            tmp_path / "c.json",
            1,
            [
                ("baseline (10 epochs)", 0.80, 1.0),
                ("baseline + 10 epochs, no method", 0.82, 1.0),
                ("CrossGET r_image=10 r_text=0, fine-tuned 10 epochs", 0.79, 0.568),
            ],
        ),
    ]
    got = {(p["seed"], p["method"], p["stage"]): round(p["delta"], 6) for p in plotter.load_points(files)}
    assert got == {
        (0, "MADTP", "shelf"): -5.0,
        (0, "MADTP", "tuned"): -0.5,
        (0, "CrossGET", "tuned"): 1.0,
        (1, "baseline", "control"): 2.0,
        (1, "CrossGET", "tuned"): -1.0,
    }
    out = tmp_path / "p.png"
    plotter.main([str(f) for f in files] + ["--plot", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_different_baselines_of_one_seed_and_foreign_files_are_refused(plotter, tmp_path):
    a = _write(tmp_path / "a.json", 0, [("baseline (10 epochs)", 0.90, 1.0)])
    b = _write(tmp_path / "b.json", 0, [("baseline (10 epochs)", 0.80, 1.0)])
    with pytest.raises(ValueError, match="seed 0's baseline R@1 is 80.00 here and 90.00"):
        plotter.load_points([a, b])
    c = tmp_path / "c.json"
    c.write_text(json.dumps({"benchmark": "clip_digits", "rows": []}))
    with pytest.raises(ValueError, match="benchmark='clip_digits', expected 'clip_digits_tokens'"):
        plotter.load_points([c])
    d = _write(tmp_path / "d.json", 3, [("MADTP towers=image, fine-tuned 10 epochs", 0.9, 0.58)])
    with pytest.raises(ValueError, match="seed 3: no baseline row"):
        plotter.load_points([d])


def test_committed_data_is_the_readme_table(plotter):
    """The README's Digits-CLIP rows (i2t R@1 %, seeds 0 / 1 / 2) are the files the plot draws."""
    points = plotter.load_points(sorted(DATA.glob("*.json")))
    r1 = {(p["method"], p["stage"], p["seed"]): p["r1"] for p in points}
    readme = (ROOT / "docs" / "results.md").read_text()  # the headline tables' home
    rows = {
        ("baseline", "control"): "baseline + 10 epochs, no method (control)",
        ("CrossGET", "tuned"): "CrossGET `r_image=10`, fine-tuned 10 epochs",
        ("MADTP", "tuned"): "MADTP, fine-tuned 10 epochs",
        ("CrossGET", "shelf"): "CrossGET `r_image=10`, off the shelf",
        ("MADTP", "shelf"): "MADTP, off the shelf (seeded random codebook)",
    }
    lines = {line.split(" | ")[0].lstrip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    stages = {p["stage"] for p in points}
    for (method, stage), label in rows.items():
        assert stage in stages, stage
        cells = " / ".join(f"{r1[(method, stage, s)]:.1f}" for s in (0, 1, 2)) + " %"
        assert cells in lines[label], (label, cells)
    ratio = {(p["method"], p["stage"], p["seed"]): p["ratio"] for p in points}
    assert all(ratio[(m, "tuned", s)] <= 0.6 for m in ("MADTP", "CrossGET") for s in (0, 1, 2))


@pytest.mark.parametrize(
    "run, expected",
    [
        ("MuE, off the shelf (fit_budget on 16 training images)", ("MuE", "shelf")),
        ("Transkimmer (flops_target=0.6, budget_tower=image), fine-tuned 10 epochs", ("Transkimmer", "tuned")),
        ("DynamicViT (flops_target=0.6, budget_tower=image), fine-tuned 10 epochs", ("DynamicViT", "tuned")),
    ],
)
def test_the_callback_budget_rows_are_read(plotter, run, expected):
    assert plotter.classify(run) == expected
