"""Baseline, ToMe, DynamicViT and EViT on digits: accuracy against GFLOPs, one command.

    python benchmarks/pareto_digits.py                      # ~10 min on 2 CPU cores
    python benchmarks/pareto_digits.py --threads 1          # on a machine other jobs share
    python benchmarks/pareto_digits.py --quick              # smoke run (~1 min): plumbing only
    python benchmarks/pareto_digits.py --seeds 0 1 2        # 3 training seeds (~30 min): mean ± std

What it does (every run seeded; the same data split, model and fine-tuning recipe for all):

1. trains the 6-block digits ViT (``vit_tiny_digits``, 65 tokens) for ``--epochs`` epochs:
   the **baseline**;
2. applies ToMe (``--tome-shelf``) and EViT (``--evit-shelf``) to copies of it **off the
   shelf** (no training; DynamicViT has no off-the-shelf form: its predictors must be trained);
3. **fine-tunes** copies of the baseline for ``--ft-epochs`` epochs with the Lightning
   callbacks — DynamicViT ρ ∈ ``--rhos`` (teacher = the baseline), EViT keep rate ∈
   ``--keep-rates`` (cosine from 1 to the target over the first fine-tuning epoch), ToMe
   r ∈ ``--tome-ft`` — and, as a control, with no method (``baseline + ft``: the same extra
   epochs, so method rows are not credited with the extra training);
4. measures each variant in eval mode: top-1 on the 360 validation images and forward FLOPs
   per image (``vleff.profile.count_flops``, i.e. torch's ``FlopCounterMode``);
5. counts FLOPs of random-init timm ``vit_small_patch16_224`` at 224 px with DynamicViT ρ=0.7
   and EViT kr=0.7 at blocks (3, 6, 9) and ToMe r=13 (FLOPs do not depend on the weights
   for these settings: token counts are fixed in eval mode);
6. writes ``results.json`` / ``results.csv`` to ``--out`` and the Pareto plot to ``--plot``.

Seeds: ``--seeds 0 1 2`` repeats steps 1-4 once per training seed (the data split stays the one
``--seed`` picks) and reports, per variant, the mean ± standard deviation over seeds of the
accuracy and of **Δ against the same-epochs control of the same seed**: fine-tuned rows
against ``baseline + ft`` (the same extra epochs without a method), off-the-shelf rows and
the control itself against the baseline. ``results.json`` keeps every seed's rows
(``rows``) and the per-variant summary (``summary``); the plot and the Pareto front use the
means.

Locations for the 6-block model are blocks (1, 3, 4) for both pruning methods (the default
"three evenly spaced" rule): at ρ = kr = 0.7 that is ~0.64x / ~0.67x of the baseline's
FLOPs, matched by ToMe r=7 (~0.67x). No speeds are measured here (shared machine); see
``vleff-bench`` for throughput.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
LOCATIONS = [1, 3, 4]  # digits ViT: 6 blocks
VIT_S_LOCATIONS = [3, 6, 9]


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--epochs", type=int, default=25, help="baseline training epochs")
    p.add_argument("--ft-epochs", type=int, default=5, help="fine-tuning epochs per method")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (45 steps per epoch)")
    p.add_argument("--lr", type=float, default=2e-3, help="baseline learning rate")
    p.add_argument("--ft-lr", type=float, default=5e-4, help="fine-tuning learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clipping (fine-tuning)")
    p.add_argument("--rhos", type=float, nargs="*", default=[0.6, 0.7, 0.8], help="DynamicViT base keep ratios")
    p.add_argument("--keep-rates", type=float, nargs="*", default=[0.5, 0.7, 0.85], help="EViT keep rates")
    p.add_argument("--tome-ft", type=int, nargs="*", default=[7, 10], help="ToMe r, fine-tuned")
    p.add_argument("--tome-shelf", type=int, nargs="*", default=[2, 4, 6, 7, 8, 10], help="ToMe r, off the shelf")
    p.add_argument("--evit-shelf", type=float, nargs="*", default=[0.5, 0.7, 0.85], help="EViT kr, off the shelf")
    p.add_argument("--seed", type=int, default=0, help="data split seed (and the training seed without --seeds)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds; each variant is trained and measured once per seed (default: --seed)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "pareto_digits", help="results folder")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "pareto_digits.png")
    p.add_argument("--no-vit-s", action="store_true", help="skip the ViT-S/16 FLOP counts")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch each, one setting per method")
    p.add_argument("--replot", action="store_true", help="only redraw the plot from --out/results.json")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds {args.seeds} repeats a seed")
    if args.quick:
        args.epochs, args.ft_epochs = 1, 1
        args.rhos, args.keep_rates, args.tome_ft = [0.7], [0.7], [7]
        args.tome_shelf, args.evit_shelf = [7], [0.7]
    return args


# --- measurement ---------------------------------------------------------------------------
def measure(model: torch.nn.Module, batches: list, flops_images: torch.Tensor) -> dict[str, float]:
    from vleff.cli.evaluate import accuracy
    from vleff.profile import count_flops

    model = model.cpu().eval()
    flops = count_flops(model, flops_images) / flops_images.shape[0]
    return {"accuracy": accuracy(model, batches), "gflops": flops / 1e9}


# --- training ------------------------------------------------------------------------------
class EpochBar:
    """A Lightning callback showing one tqdm bar per fit (epochs, last val accuracy)."""

    def __new__(cls, label: str):
        import lightning.pytorch as pl
        from tqdm.auto import tqdm

        class _Bar(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                self.bar = tqdm(total=trainer.max_epochs, desc=f"  {label}", unit="ep", leave=False)

            def on_train_epoch_end(self, trainer, pl_module):
                acc = trainer.callback_metrics.get("val/acc")
                if acc is not None:
                    self.bar.set_postfix(val_acc=f"{float(acc):.3f}")
                self.bar.update(1)

            def on_train_end(self, trainer, pl_module):
                self.bar.close()

        return _Bar()


def fit(module, datamodule, epochs: int, callbacks: list, label: str, clip: float | None) -> float:
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=clip,
        callbacks=[*callbacks, EpochBar(label)],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def new_classifier(lr: float, state: dict | None = None):
    from vleff.models import ImageClassifier

    module = ImageClassifier("vit_tiny_digits", num_classes=10, image_size=32, lr=lr)
    if state is not None:
        module.load_state_dict(state)
    return module


def run_seed(
    seed: int, args: argparse.Namespace, datamodule, batches: list, flops_images: torch.Tensor
) -> list[dict[str, Any]]:
    """Train and measure every variant once with training seed ``seed``; one row per variant."""
    import lightning.pytorch as pl
    from tqdm.auto import tqdm

    from vleff import apply_evit, apply_tome
    from vleff.callbacks import DynamicViT, EViT, TokenMerging
    from vleff.registry import remove_all

    jobs: list[tuple[str, str, str, Any]] = [("baseline", "baseline", "", None)]
    jobs += [("tome_shelf", f"ToMe r={r} (off the shelf)", f"r={r}", r) for r in args.tome_shelf]
    jobs += [("evit_shelf", f"EViT kr={k} (off the shelf)", f"kr={k}", k) for k in args.evit_shelf]
    jobs += [("baseline+ft", "baseline + fine-tune", "", None)]
    jobs += [("dynamicvit_ft", f"DynamicViT rho={r} (fine-tuned)", f"ρ={r}", r) for r in args.rhos]
    jobs += [("evit_ft", f"EViT kr={k} (fine-tuned)", f"kr={k}", k) for k in args.keep_rates]
    jobs += [("tome_ft", f"ToMe r={r} (fine-tuned)", f"r={r}", r) for r in args.tome_ft]

    rows: list[dict[str, Any]] = []
    baseline_state: dict[str, torch.Tensor] | None = None
    baseline_model = None
    bar = tqdm(jobs, desc=f"pareto_digits seed {seed}", unit="run")
    for family, name, setting, value in bar:
        bar.set_postfix_str(name)
        pl.seed_everything(seed, workers=True, verbose=False)
        seconds = 0.0
        if family == "baseline":
            module = new_classifier(args.lr)
            seconds = fit(module, datamodule, args.epochs, [], name, clip=None)
            baseline_state = copy.deepcopy(module.state_dict())
            baseline_model = module.model
            model = module.model
        elif family.endswith("_shelf"):
            model = remove_all(copy.deepcopy(baseline_model))
            if family == "tome_shelf":
                apply_tome(model, r=value)
            else:
                apply_evit(model, keep_rate=value, locations=LOCATIONS)
        else:
            module = new_classifier(args.ft_lr, baseline_state)
            callbacks = {
                "baseline+ft": lambda: [],
                "dynamicvit_ft": lambda: [DynamicViT(rho=value, locations=LOCATIONS, distill=True)],
                "evit_ft": lambda: [
                    EViT(keep_rate=value, locations=LOCATIONS, start_epoch=0, end_epoch=min(1, args.ft_epochs))
                ],
                "tome_ft": lambda: [TokenMerging(r=value)],
            }[family]()
            seconds = fit(module, datamodule, args.ft_epochs, callbacks, name, clip=args.clip)
            model = module.model
        row = {
            "seed": seed,
            "family": family,
            "name": name,
            "setting": setting,
            **measure(model, batches, flops_images),
            "train_seconds": round(seconds, 1),
        }
        rows.append(row)
        tqdm.write(
            f"{name:34s} acc {100 * row['accuracy']:6.2f}%  {row['gflops']:.4f} GFLOPs/img"
            + (f"  ({seconds:.0f} s training)" if seconds else "")
        )

    return rows


#: the control a variant's Δ is taken against (same seed, same training epochs)
CONTROL = {
    "baseline": None,
    "tome_shelf": "baseline",
    "evit_shelf": "baseline",
    "baseline+ft": "baseline",
    "dynamicvit_ft": "baseline+ft",
    "evit_ft": "baseline+ft",
    "tome_ft": "baseline+ft",
}


def add_deltas(rows: list[dict[str, Any]]) -> None:
    """Per row: FLOPs ratio and accuracy change against the baseline, and Δ against the
    same-epochs control of the same seed (``delta_vs_control_points``, ``control``)."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], {}).setdefault(row["family"], row)
    for row in rows:
        ref = by_seed[row["seed"]]
        base = ref["baseline"]
        row["flops_ratio"] = row["gflops"] / base["gflops"]
        row["accuracy_change_points"] = 100 * (row["accuracy"] - base["accuracy"])
        control = CONTROL[row["family"]]
        row["control"] = control or ""
        row["delta_vs_control_points"] = 0.0 if control is None else 100 * (row["accuracy"] - ref[control]["accuracy"])


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (in run order): mean and std over seeds of accuracy, Δ against the
    baseline and Δ against the same-epochs control; GFLOPs (the same for every seed)."""
    names: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        names.setdefault(row["name"], []).append(row)
    out = []
    for name, group in names.items():
        first = group[0]
        acc, acc_std = _mean_std([r["accuracy"] for r in group])
        d_base, d_base_std = _mean_std([r["accuracy_change_points"] for r in group])
        d_ctrl, d_ctrl_std = _mean_std([r["delta_vs_control_points"] for r in group])
        out.append(
            {
                "family": first["family"],
                "name": name,
                "setting": first["setting"],
                "seeds": [r["seed"] for r in group],
                "accuracy": acc,
                "accuracy_std": acc_std,
                "accuracy_change_points": d_base,
                "accuracy_change_std": d_base_std,
                "control": first["control"],
                "delta_vs_control_points": d_ctrl,
                "delta_vs_control_std": d_ctrl_std,
                "gflops": first["gflops"],
                "flops_ratio": first["flops_ratio"],
                "pareto": False,
            }
        )
    return out


# --- ViT-S/16 FLOP ratios ------------------------------------------------------------------
def vit_s_flops() -> list[dict[str, Any]]:
    import timm

    from vleff import apply_dynamicvit, apply_evit, apply_tome
    from vleff.profile import count_flops

    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    variants = {
        "baseline": lambda m: m,
        "dynamicvit(rho=0.7, locations=(3,6,9))": lambda m: apply_dynamicvit(
            m, rho=0.7, locations=VIT_S_LOCATIONS, distill=False
        ),
        "evit(keep_rate=0.7, locations=(3,6,9))": lambda m: apply_evit(m, keep_rate=0.7, locations=VIT_S_LOCATIONS),
        "tome(r=13)": lambda m: apply_tome(m, r=13),
    }
    rows = []
    for name, apply in variants.items():
        model = apply(copy.deepcopy(base)).eval()
        rows.append({"model": "vit_small_patch16_224", "name": name, "gflops": count_flops(model, x) / 1e9})
    for row in rows:
        row["flops_ratio"] = row["gflops"] / rows[0]["gflops"]
    return rows


# --- plot ----------------------------------------------------------------------------------
STYLE = {  # family -> (colour, marker, label)
    "baseline": ("black", "*", "baseline"),
    "baseline+ft": ("grey", "*", "baseline + fine-tune (control)"),
    "tome_shelf": ("tab:blue", "o", "ToMe off the shelf"),
    "tome_ft": ("tab:blue", "s", "ToMe fine-tuned"),
    "evit_shelf": ("tab:green", "o", "EViT off the shelf"),
    "evit_ft": ("tab:green", "s", "EViT fine-tuned"),
    "dynamicvit_ft": ("tab:red", "s", "DynamicViT fine-tuned"),
}


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows no other row beats on both accuracy (higher) and GFLOPs (lower), by GFLOPs."""
    front, best = [], -math.inf
    for row in sorted(rows, key=lambda r: (r["gflops"], -r["accuracy"])):
        if row["accuracy"] > best:
            front.append(row)
            best = row["accuracy"]
    return front


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5), dpi=130)
    front = pareto_front(rows)
    ax.step(
        [r["gflops"] for r in front],
        [100 * r["accuracy"] for r in front],
        where="post",
        color="0.8",
        lw=6,
        zorder=0,
        label="Pareto front",
    )
    for family, (colour, marker, label) in STYLE.items():
        pts = sorted((r for r in rows if r["family"] == family), key=lambda r: r["gflops"])
        if not pts:
            continue
        xs, ys = [r["gflops"] for r in pts], [100 * r["accuracy"] for r in pts]
        dashed = family.endswith("_shelf")
        ax.plot(
            xs,
            ys,
            marker=marker,
            color=colour,
            ls="--" if dashed else "-",
            lw=1.2,
            ms=12 if marker == "*" else 7,
            mfc="white" if dashed else colour,
            label=label,
        )
        for r in pts:
            if r.get("setting"):
                ax.annotate(
                    r["setting"],
                    (r["gflops"], 100 * r["accuracy"]),
                    textcoords="offset points",
                    xytext=(4, -11 if dashed else 5),
                    fontsize=7,
                    color=colour,
                )
    base = next(r for r in rows if r["family"] == "baseline")
    ax.axhline(100 * base["accuracy"] - 1, color="black", lw=0.6, ls=":", label="baseline − 1 point")
    ax.set_xlabel("GFLOPs per image (forward, eval)")
    ax.set_ylabel("top-1 accuracy on digits val (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------
def _title(settings: dict[str, Any]) -> str:
    return (
        f"digits ViT (6 blocks, 65 tokens): baseline {settings['epochs']} epochs, "
        f"fine-tunes {settings['ft_epochs']} epochs"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot:
        result = json.loads((args.out / "results.json").read_text())
        plot(result.get("summary", result["rows"]), args.plot, _title(result["settings"]))
        print(f"plot: {args.plot}")
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl  # noqa: F401  (before _quiet: Lightning sets its loggers' levels on import)

    _quiet()

    from vleff.data import DigitsDataModule

    started = time.perf_counter()
    datamodule = DigitsDataModule(image_size=32, batch_size=args.batch_size, seed=args.seed)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())
    flops_images = torch.cat([b[0] for b in batches])[:16]

    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rows += run_seed(seed, args, datamodule, batches, flops_images)
    add_deltas(rows)
    summary = summarize(rows)
    for row in pareto_front(summary):
        row["pareto"] = True

    vit_s = [] if args.no_vit_s else vit_s_flops()
    elapsed = time.perf_counter() - started
    result = {
        "command": "python benchmarks/pareto_digits.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "locations": LOCATIONS,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        },
        "elapsed_seconds": round(elapsed, 1),
        "rows": rows,
        "summary": summary,
        "vit_small_224": vit_s,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    fields = [
        "name",
        "family",
        "setting",
        "accuracy",
        "accuracy_std",
        "accuracy_change_points",
        "control",
        "delta_vs_control_points",
        "delta_vs_control_std",
        "gflops",
        "flops_ratio",
        "pareto",
    ]
    with open(args.out / "results.csv", "w", newline="") as f:  # one row per variant (means over seeds)
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    seed_fields = [
        "seed",
        "name",
        "family",
        "setting",
        "accuracy",
        "accuracy_change_points",
        "control",
        "delta_vs_control_points",
        "gflops",
        "flops_ratio",
        "train_seconds",
    ]
    with open(args.out / "results_seeds.csv", "w", newline="") as f:  # every seed's rows
        writer = csv.DictWriter(f, fieldnames=seed_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot(summary, args.plot, _title(vars(args)))
    print_summary(summary, vit_s, elapsed, args)
    return result


def print_summary(rows: list[dict[str, Any]], vit_s: list[dict[str, Any]], elapsed: float, args) -> None:
    from rich.console import Console
    from rich.table import Table

    seeds = len(rows[0]["seeds"]) if rows else 0
    pm = seeds > 1  # show ± std over seeds
    table = Table(
        title=f"digits: accuracy vs GFLOPs (eval forward), {seeds} seed{'s' if seeds != 1 else ''}"
        + (" (mean ± std)" if pm else "")
    )
    for col in ("variant", "top-1 %", "Δ vs baseline", "Δ vs control", "control", "GFLOPs/img", "× baseline", "Pareto"):
        table.add_column(col, justify="left" if col in ("variant", "control") else "right")
    for r in rows:
        table.add_row(
            r["name"],
            f"{100 * r['accuracy']:.2f}" + (f" ± {100 * r['accuracy_std']:.2f}" if pm else ""),
            f"{r['accuracy_change_points']:+.2f}" + (f" ± {r['accuracy_change_std']:.2f}" if pm else ""),
            (
                ""
                if not r["control"]
                else f"{r['delta_vs_control_points']:+.2f}" + (f" ± {r['delta_vs_control_std']:.2f}" if pm else "")
            ),
            r["control"],
            f"{r['gflops']:.4f}",
            f"{r['flops_ratio']:.3f}",
            "●" if r["pareto"] else "",
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    if vit_s:
        t2 = Table(title="ViT-S/16 @ 224 (random init, eval, batch 1)")
        for col in ("variant", "GFLOPs", "× baseline"):
            t2.add_column(col, justify="left" if col == "variant" else "right")
        for r in vit_s:
            t2.add_row(r["name"], f"{r['gflops']:.3f}", f"{r['flops_ratio']:.3f}")
        console.print(t2)
    console.print(
        f"results: {args.out}/results.json, results.csv (per variant), results_seeds.csv (per seed); "
        f"plot: {args.plot}; total {elapsed / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
