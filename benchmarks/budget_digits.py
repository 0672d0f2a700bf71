"""Every token method on digits at one matched FLOPs budget (issue 26), off the shelf and fine-tuned.

    python benchmarks/budget_digits.py                          # 3 seeds, budget 0.6 (~1 h on 2 cores)
    python benchmarks/budget_digits.py --seeds 0 --quick        # smoke run: plumbing only
    python benchmarks/budget_digits.py --methods mue transkimmer  # add rows to an earlier run
    python benchmarks/budget_digits.py --replot                 # redraw docs/img/budget_digits.png

What it does, per training seed (the data split is the one ``--seed`` picks, as in
``benchmarks/pareto_digits.py``, whose model, recipe and measurement this reuses):

1. trains the 6-block digits ViT (``vit_tiny_digits``, 65 tokens) for ``--epochs``: the **baseline**,
   and fine-tunes a copy ``--ft-epochs`` more with no method: the **control** (both cached in
   ``--out``, so a later run with other ``--methods`` adds rows to the same baselines);
2. **off the shelf** (training-free methods: ToMe, Turbo, EViT, MuE): applies the method to a copy of
   the baseline with no reduction and lets :func:`vleff.fit_budget` set its own knob (ToMe/Turbo
   ``r``, EViT keep rate, MuE threshold) so the FLOPs measured on ``--budget-batches`` *training*
   batches are ``--budget`` × the baseline's;
3. **fine-tuned** (every token method): fine-tunes a copy of the baseline ``--ft-epochs`` with the
   method's Lightning callback; ToMe, Turbo, EViT and DynamicViT get ``flops_target=--budget`` (the
   callback fits the knob on training batches at the start of ``fit``); Transkimmer trains its skim
   predictors with its skim loss, MuE its exits with its layer-wise loss, and both are fitted to the
   budget after training (their FLOPs depend on what they learned), on the same training batches;
4. measures every variant in eval mode on the 360 validation images: top-1, and FLOPs per image
   (``vleff.profile.count_flops`` one image at a time, as the budget is fitted: see
   :func:`one_by_one` — Transkimmer's and MuE's cost depends on the data, so the ratio measured
   here may differ from the one fitted on training images; it is reported as measured).

Transkimmer is fine-tuned with ``--skim-coefficient`` 0.1 (the reference's 0.5 drives the
predictors of this converged model to skim most tokens; docs/benchmarks.md has the figures).

Δ is taken against the same-epochs control of the same seed (fine-tuned rows against the control,
off-the-shelf rows against the baseline). Writes ``results.json`` / ``results.csv`` to ``--out`` and
the plot (accuracy against measured FLOPs, all methods, mean ± std over seeds) to ``--plot``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pareto_digits import LOCATIONS, _mean_std, _quiet, fit, new_classifier, pareto_front  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: method -> (label, training-free, settings applied off the shelf before the budget fit)
METHODS: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "tome": ("ToMe", True, {"r": 0}),
    "turbo": ("Turbo", True, {"r": 0}),
    "evit": ("EViT", True, {"keep_rate": 1.0, "locations": LOCATIONS}),
    "dynamicvit": ("DynamicViT", False, {}),
    "transkimmer": ("Transkimmer", False, {}),
    "mue": ("MuE", True, {"image_threshold": 1.0}),
}
COLOURS = {
    "tome": "tab:blue",
    "turbo": "tab:purple",
    "evit": "tab:green",
    "dynamicvit": "tab:red",
    "transkimmer": "tab:orange",
    "mue": "tab:brown",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.6, help="FLOPs target, × the baseline's")
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS), help="token methods")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds")
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    p.add_argument("--epochs", type=int, default=25, help="baseline training epochs")
    p.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs (control and methods)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="baseline learning rate")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (fine-tuning)")
    p.add_argument("--budget-batches", type=int, default=4, help="training batches the budget is fitted on")
    p.add_argument(
        "--skim-coefficient",
        type=float,
        default=0.1,
        help="Transkimmer's skim-loss weight (0.5, run_glue.sh's, skims the converged digits ViT too far: see docs)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "budget_digits")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "budget_digits.png")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch each")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from --out/results.json")
    args = p.parse_args(argv)
    if not 0 < args.budget <= 1:
        p.error(f"--budget {args.budget} must be in (0, 1]")
    if args.quick:
        args.epochs, args.ft_epochs = 1, 1
    return args


# --- measurement ---------------------------------------------------------------------------
def measure(model: torch.nn.Module, batches: list) -> dict[str, float]:
    """Top-1 (batches as given) and forward FLOPs per image, eval mode: counted one image at a time
    (``gflops``, what the budget is of) and in the batches as given (``gflops_batched``: equal for
    every method but Transkimmer, whose batch runs at its widest image's kept count)."""
    from vleff.cli.evaluate import accuracy
    from vleff.profile import count_flops

    model = model.cpu().eval()
    singles = one_by_one(batches)
    flops = sum(count_flops(model, x) for x in singles) / len(singles)
    batched = sum(count_flops(model, b[0]) for b in batches) / len(singles)
    return {"accuracy": accuracy(model, batches), "gflops": flops / 1e9, "gflops_batched": batched / 1e9}


def one_by_one(batches: list) -> list[torch.Tensor]:
    """Each image of ``(images, labels)`` batches as a batch of one.

    The budget is of what an image costs. For a method that keeps a fixed number of tokens per
    image (ToMe, Turbo, EViT, DynamicViT) or compacts its batch (MuE) this is the batch's cost per
    image; Transkimmer's batched inference runs as many tokens as the batch's widest sample keeps
    (before issue 28: the *union* of the tokens its samples keep, so at batch 32 nearly every token
    ran and a budget fitted on batches forced each image to skim almost everything, the collapse
    of the first run: 0.713x, 49.17 %), so a batch costs more per image than an image alone."""
    return [b[0][i : i + 1] for b in batches for i in range(int(b[0].shape[0]))]


def fit_to_budget(model: torch.nn.Module, method: str, batches: list, budget: float) -> dict[str, Any]:
    """``vleff.fit_budget`` on ``batches``' images one at a time (:func:`one_by_one`; closest
    reachable if out of reach: reported)."""
    import warnings

    from vleff.budget import fit_budget

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        fitted = fit_budget(model, one_by_one(batches), flops=budget, method=method, strict=False)
    note = "; ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    return {"settings": fitted.settings, "fitted_ratio": fitted.ratio, "note": note}


# --- one seed ------------------------------------------------------------------------------
def baselines(seed: int, args, datamodule) -> tuple[dict, dict]:
    """The baseline's and the control's state dicts, trained once per seed and cached."""
    import lightning.pytorch as pl

    path = args.out / f"seed{seed}_e{args.epochs}_ft{args.ft_epochs}_states.pt"
    if path.exists():
        states = torch.load(path, weights_only=True)
        return states["baseline"], states["control"]
    pl.seed_everything(seed, workers=True, verbose=False)
    module = new_classifier(args.lr)
    fit(module, datamodule, args.epochs, [], f"baseline seed {seed}", clip=None)
    baseline = copy.deepcopy(module.state_dict())
    pl.seed_everything(seed, workers=True, verbose=False)
    module = new_classifier(args.ft_lr, baseline)
    fit(module, datamodule, args.ft_epochs, [], f"control seed {seed}", clip=args.clip)
    control = copy.deepcopy(module.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"baseline": baseline, "control": control}, path)
    return baseline, control


def callback(method: str, budget: float, skim_coefficient: float = 0.1) -> Any:
    from vleff import callbacks as cb

    return {
        "tome": lambda: cb.TokenMerging(flops_target=budget),
        "turbo": lambda: cb.Turbo(flops_target=budget),
        "evit": lambda: cb.EViT(locations=LOCATIONS, flops_target=budget),
        "dynamicvit": lambda: cb.DynamicViT(locations=LOCATIONS, distill=True, flops_target=budget),
        "transkimmer": lambda: cb.Transkimmer(skim_coefficient=skim_coefficient),
        "mue": lambda: cb.MuE(layerwise_loss=True),
    }[method]()


def run_method(method: str, mode: str, seed: int, args, datamodule, states, budget_batches, val) -> dict[str, Any]:
    import lightning.pytorch as pl

    from vleff.registry import get_method, remove_all

    label, _, shelf_settings = METHODS[method]
    pl.seed_everything(seed, workers=True, verbose=False)
    fitted: dict[str, Any] = {}
    if mode == "shelf":
        model = remove_all(new_classifier(args.lr, states["baseline"]).model)
        get_method(method).apply(model, **shelf_settings)
        fitted = fit_to_budget(model, method, budget_batches, args.budget)
    else:
        module = new_classifier(args.ft_lr, states["baseline"])
        calls = [callback(method, args.budget, args.skim_coefficient)]
        fit(module, datamodule, args.ft_epochs, calls, f"{label} seed {seed}", args.clip)
        model = module.model
        if method in ("transkimmer", "mue"):  # data-dependent cost: fitted to what was learned
            fitted = fit_to_budget(model, method, budget_batches, args.budget)
        else:
            fitted = {"settings": get_method(method).applied_settings(model)}
    return {
        "seed": seed,
        "method": method,
        "mode": mode,
        "name": f"{label} ({'off the shelf' if mode == 'shelf' else 'fine-tuned'})",
        **measure(model, val),
        "settings": {k: v for k, v in fitted.get("settings", {}).items() if not isinstance(v, torch.Tensor)},
        "fitted_ratio": fitted.get("fitted_ratio"),
        "note": fitted.get("note", ""),
    }


# --- summary and plot ----------------------------------------------------------------------
#: the same-epochs reference of each kind of row
CONTROL = {"baseline": None, "control": "baseline", "shelf": "baseline", "ft": "control"}


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_seed = {(r["seed"], r["method"], r["mode"]): r for r in rows}
    out = []
    for key in dict.fromkeys((r["method"], r["mode"], r["name"]) for r in rows):
        method, mode, name = key
        group = [r for r in rows if (r["method"], r["mode"]) == (method, mode)]
        control = CONTROL[mode]
        refs = [by_seed.get((r["seed"], control, control)) if control else None for r in group]
        deltas = [100 * (r["accuracy"] - ref["accuracy"]) if ref else math.nan for r, ref in zip(group, refs)]
        ratios = [r["gflops"] / by_seed[(r["seed"], "baseline", "baseline")]["gflops"] for r in group]
        # rows of runs before gflops_batched was recorded have none (their methods' cost per image
        # does not depend on the batch: see measure)
        batched = [
            r["gflops_batched"] / by_seed[(r["seed"], "baseline", "baseline")]["gflops"]
            for r in group
            if "gflops_batched" in r
        ]
        acc, acc_std = _mean_std([r["accuracy"] for r in group])
        d, d_std = _mean_std(deltas)
        out.append(
            {
                "method": method,
                "mode": mode,
                "name": name,
                "seeds": [r["seed"] for r in group],
                "accuracy": acc,
                "accuracy_std": acc_std,
                "control": control or "",
                "delta_vs_control_points": d if control else 0.0,
                "delta_vs_control_std": d_std if control else 0.0,
                "gflops": sum(r["gflops"] for r in group) / len(group),
                "flops_ratio": sum(ratios) / len(ratios),
                "flops_ratio_range": [min(ratios), max(ratios)],
                "flops_ratio_batched": sum(batched) / len(batched) if len(batched) == len(group) else None,
                "pareto": False,
            }
        )
    for row in pareto_front(out):
        row["pareto"] = True
    return out


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: accuracy against measured FLOPs (every variant, mean ± std); right: Δ against the
    same-epochs control at the budget, one bar per method (the points crowd at one FLOPs value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 5), dpi=130, gridspec_kw={"width_ratios": [1.3, 1]})
    for r in summary:
        x, y, err = r["flops_ratio"], 100 * r["accuracy"], 100 * r["accuracy_std"]
        if r["mode"] in ("baseline", "control"):
            colour, marker, face = ("black" if r["mode"] == "baseline" else "grey"), "*", None
        else:
            colour = COLOURS[r["method"]]
            marker, face = ("o", "white") if r["mode"] == "shelf" else ("s", colour)
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt=marker,
            color=colour,
            mfc=face or colour,
            ms=12 if marker == "*" else 7,
            capsize=3,
            label=r["name"],
        )
    ax.set_xlabel("measured FLOPs per image, × the baseline's (validation, eval)")
    ax.set_ylabel("top-1 on digits val (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    methods = [r for r in summary if r["mode"] in ("shelf", "ft")]
    ys = range(len(methods))
    bars.barh(
        list(ys),
        [r["delta_vs_control_points"] for r in methods],
        xerr=[r["delta_vs_control_std"] for r in methods],
        color=[COLOURS[r["method"]] if r["mode"] == "ft" else "white" for r in methods],
        edgecolor=[COLOURS[r["method"]] for r in methods],
        capsize=3,
    )
    bars.set_yticks(list(ys), [f"{r['name']} {r['flops_ratio']:.2f}×" for r in methods], fontsize=7)
    bars.invert_yaxis()
    bars.axvline(0, color="black", lw=0.8)
    bars.set_xlabel("Δ top-1 (points) vs the same-epochs control\n(fine-tuned: control; off the shelf: baseline)")
    bars.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _seeds(summary: list[dict[str, Any]]) -> int:
    """Seeds in the results (a run may have added rows for some seeds only)."""
    return len({seed for row in summary for seed in row["seeds"]})


def _title(settings: dict[str, Any], seeds: int) -> str:
    return (
        f"digits ViT (6 blocks, 65 tokens) at {settings['budget']}× FLOPs: baseline {settings['epochs']} epochs, "
        f"fine-tunes {settings['ft_epochs']} epochs, {seeds} seed{'s' if seeds != 1 else ''}"
    )


# --- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results_path = args.out / "results.json"
    if args.replot:
        result = json.loads(results_path.read_text())
        plot(result["summary"], args.plot, _title(result["settings"], _seeds(result["summary"])))
        print(f"plot: {args.plot}")
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl  # noqa: F401  (before _quiet: Lightning sets its loggers' levels on import)
    from tqdm.auto import tqdm

    _quiet()
    from vleff.data import DigitsDataModule

    started = time.perf_counter()
    datamodule = DigitsDataModule(image_size=32, batch_size=args.batch_size, seed=args.seed)
    datamodule.setup("fit")
    val = list(datamodule.val_dataloader())
    torch.manual_seed(args.seed)
    budget_batches = [b for _, b in zip(range(args.budget_batches), datamodule.train_dataloader())]

    earlier = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    same = lambda r: r.get("budget") == args.budget and r.get("epochs") == [args.epochs, args.ft_epochs]
    rows = [r for r in earlier if not same(r) or r["method"] not in args.methods or r["seed"] not in args.seeds]
    kept = {(r["seed"], r["method"], r["mode"]) for r in rows}
    for seed in args.seeds:
        states = None
        jobs = [("baseline", "baseline"), ("control", "control")]
        jobs += [(m, mode) for m in args.methods for mode in ("shelf", "ft") if mode == "ft" or METHODS[m][1]]
        bar = tqdm(jobs, desc=f"budget_digits seed {seed}", unit="run")
        for method, mode in bar:
            if (seed, method, mode) in kept:
                continue
            bar.set_postfix_str(f"{method} {mode}")
            states = states or dict(zip(("baseline", "control"), baselines(seed, args, datamodule)))
            if mode in ("baseline", "control"):
                row = {"seed": seed, "method": mode, "mode": mode, "name": mode, "settings": {}}
                row.update(measure(new_classifier(args.lr, states[mode]).model, val))
            else:
                row = run_method(method, mode, seed, args, datamodule, states, budget_batches, val)
            row.update({"budget": args.budget, "epochs": [args.epochs, args.ft_epochs]})
            rows.append(row)
            tqdm.write(f"seed {seed} {row['name']:34s} acc {100 * row['accuracy']:6.2f}%  {row['gflops']:.5f} GFLOPs")
            summary = summarize([r for r in rows if same(r)])
            result = {
                "command": "python benchmarks/budget_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "environment": {"torch": torch.__version__, "python": platform.python_version()},
                "rows": rows,
                "summary": summary,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(result, indent=2, default=str))
    summary = summarize([r for r in rows if same(r)])
    result["summary"] = summary
    results_path.write_text(json.dumps(result, indent=2, default=str))
    fields = ["name", "accuracy", "accuracy_std", "control", "delta_vs_control_points", "delta_vs_control_std"]
    fields += ["gflops", "flops_ratio", "flops_ratio_range", "flops_ratio_batched", "pareto"]
    with open(args.out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    plot(summary, args.plot, _title(vars(args), _seeds(summary)))
    for r in summary:
        pm = f" ± {100 * r['accuracy_std']:.2f}" if len(r["seeds"]) > 1 else ""
        delta = f"{r['delta_vs_control_points']:+.2f} vs {r['control']}" if r["control"] else ""
        print(f"{r['name']:34s} {100 * r['accuracy']:6.2f}{pm}  {r['flops_ratio']:.3f}×  {delta}")
    print(f"results: {results_path}; plot: {args.plot}; {(time.perf_counter() - started) / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
