"""Plot what ``clip_digits_tokens.py`` measured: image→text R@1 against image-tower FLOPs, every
seed on one picture, each point relative to its own seed's baseline.

    python benchmarks/plot_clip_digits_tokens.py docs/data/clip_digits_tokens/*.json \\
        --plot docs/img/clip_digits_tokens.png

Each input is one ``clip_digits_tokens.py`` output (one seed, some methods); files of the same
seed and baseline weights are joined, so a method re-run alone (``--methods crossget
--baseline-weights ...``) lands beside the other rows of its seed. The y axis is R@1 minus the
seed's baseline R@1, so seeds whose baselines differ by a point can be read together; the
shaded band is the issue's target (within 1 point of the baseline; every method row is at
≤ 0.6× image FLOPs, written under its column).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METHOD_STYLE = {
    "ToMe": "tab:orange",
    "Turbo": "tab:brown",
    "EViT": "tab:purple",
    "CrossGET": "tab:blue",
    "MADTP": "tab:red",
    "DynamicViT": "tab:cyan",
    "Transkimmer": "tab:olive",
    "MuE": "tab:gray",
}
TARGET_RATIO, TARGET_DROP = 0.6, 1.0


def seed_of(result: dict[str, Any]) -> int:
    """The ``seed=`` Hydra override of a run (the experiment's default, 0, when none was given)."""
    for override in result.get("overrides", []):
        key, _, value = override.partition("=")
        if key.strip() == "seed":
            return int(value)
    return 0


def classify(run: str) -> tuple[str, str]:
    """(method, stage) of a row's ``run`` label: stage is baseline, control, shelf or tuned."""
    if run.startswith("baseline ("):
        return "baseline", "baseline"
    if run.startswith("baseline +"):
        return "baseline", "control"
    method = run.split()[0].rstrip(",")
    if method not in METHOD_STYLE:
        raise ValueError(f"run={run!r}: not a row of clip_digits_tokens.py (methods: {sorted(METHOD_STYLE)})")
    return method, "shelf" if "off the shelf" in run else "tuned"


def load_points(paths: list[Path]) -> list[dict[str, Any]]:
    """One point per (seed, method, stage), with R@1 in points relative to the seed's baseline."""
    points: dict[tuple[int, str, str], dict[str, Any]] = {}
    baselines: dict[int, tuple[float, str | None]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        if result.get("benchmark") != "clip_digits_tokens":
            raise ValueError(f"{path}: benchmark={result.get('benchmark')!r}, expected 'clip_digits_tokens'")
        seed = seed_of(result)
        for row in result["rows"]:
            method, stage = classify(row["run"])
            r1 = 100 * row["i2t_R@1"]
            if stage == "baseline":
                known = baselines.setdefault(seed, (r1, row.get("weights")))
                if abs(known[0] - r1) > 1e-6:
                    raise ValueError(
                        f"{path}: seed {seed}'s baseline R@1 is {r1:.2f} here and {known[0]:.2f} "
                        "in another file: join only runs of the same baseline weights"
                    )
                continue
            points[(seed, method, stage)] = {
                "seed": seed,
                "method": method,
                "stage": stage,
                "r1": r1,
                "ratio": row["image_flops_ratio"],
                "run": row["run"],
            }
    for point in points.values():
        if point["seed"] not in baselines:
            raise ValueError(f"seed {point['seed']}: no baseline row among the inputs")
        point["delta"] = point["r1"] - baselines[point["seed"]][0]
    return sorted(points.values(), key=lambda p: (p["method"], p["seed"], p["stage"]))


COLUMNS = (  # (method, stage, label) left to right
    *((m, stage, f"{m}\n{words}") for m in METHOD_STYLE for stage, words in (("shelf", "shelf"), ("tuned", "tuned"))),
    ("baseline", "control", "control:\nsame epochs"),
)
SEED_MARKERS = "osD^v<>p"


def plot(points: list[dict[str, Any]], path: Path) -> None:
    """One column per (method, stage), one marker per seed; the column's FLOPs under its name
    (the FLOPs differ by a hundredth between seeds, the accuracy by points: a FLOPs x axis would
    stack every point on one vertical line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({p["seed"] for p in points})
    columns = [c for c in COLUMNS if any((p["method"], p["stage"]) == c[:2] for p in points)]
    fig, ax = plt.subplots(figsize=(max(8.5, 1.0 * len(columns) + 1.5), 4.6), dpi=130)
    ax.axhspan(-TARGET_DROP, max(2.0, max(p["delta"] for p in points) + 0.5), color="tab:green", alpha=0.08, lw=0)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(-TARGET_DROP, color="black", lw=0.6, ls=":")
    ticks = []
    for x, (method, stage, label) in enumerate(columns):
        colour = METHOD_STYLE.get(method, "grey")
        mine = [p for p in points if (p["method"], p["stage"]) == (method, stage)]
        for p in mine:
            i = seeds.index(p["seed"])
            dx = (i - (len(seeds) - 1) / 2) * 0.12
            ax.scatter(
                x + dx,
                p["delta"],
                marker=SEED_MARKERS[i % len(SEED_MARKERS)],
                s=52,
                zorder=4,
                facecolors=colour if stage == "tuned" else "white",
                edgecolors=colour,
            )
        ratios = [p["ratio"] for p in mine]
        flops = f"{min(ratios):.3f}×" if max(ratios) - min(ratios) < 5e-4 else f"{min(ratios):.3f}–{max(ratios):.3f}×"
        ticks.append(f"{label}\n{flops}")
    for i, seed in enumerate(seeds):  # legend: seeds only (columns are labelled on the axis)
        ax.scatter(
            [],
            [],
            marker=SEED_MARKERS[i % len(SEED_MARKERS)],
            facecolors="white",
            edgecolors="black",
            label=f"seed {seed}",
        )
    ax.fill_between([], [], [], color="tab:green", alpha=0.15, label=f"within {TARGET_DROP:g} point of the baseline")
    ax.set_xticks(range(len(columns)), ticks, fontsize=7)
    ax.set_xlim(-0.5, len(columns) - 0.5)
    ax.set_ylabel("image→text R@1 − the seed's baseline (points)")
    ax.set_xlabel("method, off the shelf (hollow) or fine-tuned (filled), and its image-tower FLOPs ×", fontsize=8)
    ax.set_title(
        f"Digits-CLIP (6 blocks, 65 image tokens, 360 val pairs = 0.28 points each), "
        f"image tower reduced to ≤ {TARGET_RATIO}× FLOPs",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summary(points: list[dict[str, Any]]) -> list[str]:
    """A markdown table: per (method, stage), over seeds, the FLOPs ratio, R@1 mean ± std, and the
    mean Δ against each seed's baseline and (fine-tuned rows, the same extra epochs) its control."""
    import statistics

    control = {p["seed"]: p["r1"] for p in points if p["stage"] == "control"}
    lines = [
        "| run | image FLOPs × | seeds | i2t R@1 % (mean ± std) | Δ vs baseline | Δ vs control |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, stage, label in COLUMNS:
        mine = [p for p in points if (p["method"], p["stage"]) == (method, stage)]
        if not mine:
            continue
        r1 = [p["r1"] for p in mine]
        spread = statistics.stdev(r1) if len(r1) > 1 else 0.0
        vs_control = [p["r1"] - control[p["seed"]] for p in mine if stage == "tuned" and p["seed"] in control]
        lines.append(
            f"| {label.replace(chr(10), ' ')} | {statistics.mean(p['ratio'] for p in mine):.3f} | {len(mine)} | "
            f"{statistics.mean(r1):.2f} ± {spread:.2f} | {statistics.mean(p['delta'] for p in mine):+.2f} | "
            + (f"{statistics.mean(vs_control):+.2f} |" if vs_control else "— |")
        )
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="clip_digits_tokens.py output files")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/clip_digits_tokens.png"))
    args = parser.parse_args(argv)
    points = load_points(args.inputs)
    plot(points, args.plot)
    for p in points:
        print(
            f"seed {p['seed']}  {p['method']:8s} {p['stage']:7s} {p['ratio']:.3f}x  R@1 {p['r1']:6.2f}  "
            f"({p['delta']:+.2f})"
        )
    print("\n".join(summary(points)))
    print(f"plot: {args.plot}")
    return points


if __name__ == "__main__":
    main()
