"""benchmarks/pareto_digits.py over several seeds: Δ against the same-seed, same-epochs control,
and the mean ± std summary, on hand-made rows (no training)."""

from __future__ import annotations

import importlib.util
import math

import pytest
from repo import ROOT


@pytest.fixture(scope="module")
def pareto():
    spec = importlib.util.spec_from_file_location("pareto_digits", ROOT / "benchmarks" / "pareto_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows():
    acc = {  # seed -> family -> accuracy
        0: {"baseline": 0.90, "tome_shelf": 0.85, "baseline+ft": 0.93, "tome_ft": 0.92},
        1: {"baseline": 0.80, "tome_shelf": 0.78, "baseline+ft": 0.85, "tome_ft": 0.86},
        2: {"baseline": 0.86, "tome_shelf": 0.80, "baseline+ft": 0.88, "tome_ft": 0.85},
    }
    gflops = {"baseline": 1.0, "tome_shelf": 0.6, "baseline+ft": 1.0, "tome_ft": 0.6}
    return [
        {"seed": s, "family": f, "name": f, "setting": "", "accuracy": a, "gflops": gflops[f]}
        for s, fams in acc.items()
        for f, a in fams.items()
    ], acc


def test_seeds_option(pareto):
    assert pareto.parse_args([]).seeds == [0]
    assert pareto.parse_args(["--seed", "4"]).seeds == [4]
    assert pareto.parse_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]
    with pytest.raises(SystemExit):
        pareto.parse_args(["--seeds", "1", "1"])


def test_delta_is_against_the_same_seed_control(pareto):
    rows, acc = _rows()
    pareto.add_deltas(rows)
    for row in rows:
        a = acc[row["seed"]]
        want = {
            "baseline": 0.0,
            "tome_shelf": a["tome_shelf"] - a["baseline"],
            "baseline+ft": a["baseline+ft"] - a["baseline"],
            "tome_ft": a["tome_ft"] - a["baseline+ft"],
        }
        assert math.isclose(row["delta_vs_control_points"], 100 * want[row["family"]], abs_tol=1e-9), row
        assert math.isclose(row["accuracy_change_points"], 100 * (a[row["family"]] - a["baseline"]), abs_tol=1e-9)


def test_summary_mean_and_std_over_seeds(pareto):
    rows, acc = _rows()
    pareto.add_deltas(rows)
    summary = {r["name"]: r for r in pareto.summarize(rows)}
    assert list(summary) == ["baseline", "tome_shelf", "baseline+ft", "tome_ft"]
    deltas = [100 * (acc[s]["tome_ft"] - acc[s]["baseline+ft"]) for s in (0, 1, 2)]  # -1, +1, -3
    mean = sum(deltas) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)  # sample std
    ft = summary["tome_ft"]
    assert ft["seeds"] == [0, 1, 2] and ft["control"] == "baseline+ft"
    assert math.isclose(ft["delta_vs_control_points"], mean, abs_tol=1e-9)
    assert math.isclose(ft["delta_vs_control_std"], std, abs_tol=1e-9)
    assert math.isclose(ft["accuracy"], (0.92 + 0.86 + 0.85) / 3, abs_tol=1e-12)
    assert math.isclose(ft["flops_ratio"], 0.6)
    single = pareto.summarize([r for r in rows if r["seed"] == 0])
    assert all(r["accuracy_std"] == 0.0 and r["delta_vs_control_std"] == 0.0 for r in single)
