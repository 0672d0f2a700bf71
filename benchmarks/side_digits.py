"""Every tuning method on digits: accuracy against training memory.

    python benchmarks/side_digits.py [--epochs 15] [--ft-epochs 4] [--seeds 0 1 2] [--methods full,lora,...]
        [--out side_digits.json] [--plot docs/img/side_digits.png]

1. **pretraining**: the 6-block, 128-wide digits ViT (``vit_tiny_digits``, 65 tokens; the
   bundled 8x8 digits at 32 px) trained from scratch on upright digits for ``--epochs`` epochs
   with ``benchmarks/pareto_digits.py``'s recipe (AdamW, warm-up and cosine, batch 64), once per
   seed;
2. **the shifted task**: the same digits rotated by 90° (train and validation split alike; the
   labels unchanged). Starting from the pretrained weights, every method trains for the same
   ``--ft-epochs`` epochs (the same number of steps) in a real ``Trainer.fit`` through its own
   vleff callback (the registry entry's, with its ``bench_settings``; LoRA-family rank 8, LST
   r=8, UniPT factor 2, VQT T=1 — ``side_memory.SIDE_SETTINGS``): full fine-tuning, linear probe
   (head only) and every tuning method the registry holds (``side_memory.tuning_methods``: a
   method that lands is in the table with no edit). The head trains in every method.

Learning rates: ``--ft-lr`` (full fine-tuning and Child-Tuning, which updates every parameter)
and ``--peft-lr`` (every other method: they train a few, mostly zero-initialised parameters and
conventionally use a larger rate); no sweep. Xattn (no cross-attention in a ViT) and LoRAHub
(composes LoRA modules of other tasks: ``benchmarks/lorahub_digits.py``) are left out.

Per method: top-1 on the rotated validation split (eval mode; mean ± std over ``--seeds``, the
data split fixed by the first), and the training memory of one step at the training batch (64)
on the trained module, measured with ``benchmarks/side_memory.py``'s :func:`measure_step` (bytes
saved for backward, each storage once, parameters excluded; ``.grad`` bytes; AdamW state bytes).
The plot puts accuracy against their sum. CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pareto_digits import _quiet, fit, new_classifier  # noqa: E402  (same folder: one recipe)
from side_memory import SIDE_SETTINGS, measure_step, tuning_methods  # noqa: E402  (one memory measurement)

#: how the table names the two references (a method's label is its registry display name)
LABELS = {"full": "full fine-tuning", "linear": "linear probe"}
#: tuning methods that cannot run this recipe, and why (left out of the default list, refused by name)
NOT_ON_DIGITS = {
    "xattn": "tunes cross-attention, which a ViT classifier does not have (BLIP's text models only)",
    "lorahub": "composes LoRA modules trained beforehand on other tasks: benchmarks/lorahub_digits.py",
}
#: regularisers of full fine-tuning (every parameter updates): trained at full fine-tuning's rate
FULL_RATE = ("full", "child_tuning_f", "child_tuning_d")
MIB = 2**20


def rotated_digits(seed: int):
    """The digits DataModule with every image rotated by 90° (the shifted task)."""
    from torch.utils.data import TensorDataset

    from vleff.data import DigitsDataModule

    class RotatedDigits(DigitsDataModule):
        def setup(self, stage: str | None = None) -> None:
            super().setup(stage)
            for name in ("train_set", "val_set"):
                images, labels = getattr(self, name).tensors
                setattr(self, name, TensorDataset(torch.rot90(images, 1, dims=(2, 3)).contiguous(), labels))

    return RotatedDigits(image_size=32, batch_size=64, seed=seed)


def head_only():
    """A callback training only the timm head (the linear probe)."""
    import lightning.pytorch as pl

    class LinearProbe(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            for name, p in pl_module.named_parameters():
                p.requires_grad_(name.startswith("model.head."))

    return LinearProbe()


def label(method: str) -> str:
    from vleff.registry import get_method

    return LABELS.get(method) or get_method(method).display_name or method


def callbacks_for(method: str) -> list:
    """The method's own Lightning callback (its registry entry), with the table's settings."""
    if method == "full":
        return []
    if method == "linear":
        return [head_only()]
    import importlib

    from vleff.registry import get_method

    entry = get_method(method)
    module, _, name = entry.callback.rpartition(".")
    return [getattr(importlib.import_module(module), name)(**{**entry.bench_settings, **SIDE_SETTINGS.get(method, {})})]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: accuracy against training memory (log), labelled where the points do not crowd (below
    half of full fine-tuning's memory, or the five most accurate); right: every method ranked by
    accuracy, its memory against full fine-tuning's in the label, so crowded points stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = next((r["training_bytes"] for r in rows if r["method"] == "full"), max(r["training_bytes"] for r in rows))
    best = {r["method"] for r in sorted(rows, key=lambda r: -r["accuracy"])[:5]}
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 5.2), dpi=130, gridspec_kw={"width_ratios": [1.25, 1]})
    for r in rows:
        x, y = r["training_bytes"] / MIB, 100 * r["accuracy"]
        ax.errorbar([x], [y], yerr=[100 * r.get("accuracy_std", 0.0)], fmt="o", ms=5, capsize=3, alpha=0.85)
        if r["training_bytes"] < 0.5 * full or r["method"] in best:
            ax.annotate(label(r["method"]), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(100 * rows[0]["start_accuracy"], color="0.5", lw=0.8, ls=":", label="pretrained, before tuning")
    ax.set_xscale("log")
    ax.margins(x=0.2)  # room for the labels of the outermost points
    ax.set_xlabel("training memory of one step, MiB (saved for backward + .grad + AdamW state; log)")
    ax.set_ylabel("top-1 on rotated digits val (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    ranked = sorted(rows, key=lambda r: r["accuracy"])
    ys = range(len(ranked))
    bars.barh(
        list(ys),
        [100 * r["accuracy"] for r in ranked],
        xerr=[100 * r.get("accuracy_std", 0.0) for r in ranked],
        color=["C3" if r["method"] == "full" else "C0" for r in ranked],
        alpha=0.8,
        capsize=2,
    )
    bars.set_yticks(list(ys), [f"{label(r['method'])} ({r['training_bytes'] / full:.2f}×)" for r in ranked], fontsize=7)
    bars.set_xlabel("top-1 % (memory × full fine-tuning's in brackets)")
    bars.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--ft-epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--peft-lr", type=float, default=2e-3)
    parser.add_argument("--methods", default=None, help="comma-separated (default: full, linear, every tuning method)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0], help="pretraining and tuning seeds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--replot", default=None, help="draw --plot from this --out JSON (no training)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --out (written after every run) and do only the missing ones",
    )
    args = parser.parse_args(argv)
    if args.resume and not args.out:
        raise SystemExit("--resume: needs --out (the file whose runs are kept)")
    if args.replot:
        return replot(Path(args.replot), Path(args.plot or Path(args.replot).with_suffix(".png")))
    known = [m for m in tuning_methods() if m not in NOT_ON_DIGITS]
    methods = args.methods.split(",") if args.methods else list(known)
    for method in methods:
        if method in NOT_ON_DIGITS:
            raise SystemExit(f"--methods: {method} {NOT_ON_DIGITS[method]}")
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(known)}")
    _quiet()
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from vleff.cli.evaluate import accuracy
    from vleff.data import DigitsDataModule

    started = time.perf_counter()
    split = args.seeds[0]  # the data split (every training seed sees the same one)
    upright = DigitsDataModule(image_size=32, batch_size=64, seed=split)
    shifted = rotated_digits(split)
    shifted.setup("fit")
    upright.setup("fit")
    val = list(shifted.val_dataloader())
    train_x, train_y = next(iter(shifted.train_dataloader()))

    runs = done_runs(Path(args.out), args.seeds, methods) if args.resume else []
    done = {(r["seed"], r["method"]) for r in runs}
    for seed in args.seeds:
        if all((seed, m) in done for m in methods):
            continue
        pl.seed_everything(seed, verbose=False)
        base = new_classifier(args.lr)
        seconds = fit(base, upright, args.epochs, [], f"pretrain seed {seed}", None)
        pre = {
            "upright_accuracy": accuracy(base, list(upright.val_dataloader())),
            "start_accuracy": accuracy(base, val),
            "pretrain_seconds": round(seconds, 1),
        }
        print(
            f"seed {seed} pretrained: upright {100 * pre['upright_accuracy']:.2f} %, rotated before tuning "
            f"{100 * pre['start_accuracy']:.2f} % ({seconds:.0f} s)",
            flush=True,
        )
        weights = {k: v.clone() for k, v in base.state_dict().items()}
        for method in methods:
            if (seed, method) in done:
                continue
            pl.seed_everything(seed, verbose=False)
            module = new_classifier(args.ft_lr if method in FULL_RATE else args.peft_lr, weights)
            pl.seed_everything(seed + 1, verbose=False)
            seconds = fit(module, shifted, args.ft_epochs, callbacks_for(method), method, None)
            acc = accuracy(module, val)
            mem = measure_step(module, method, train_x, train_y)  # one more step, after the accuracy
            row = {
                "seed": seed,
                "method": method,
                "accuracy": acc,
                "train_seconds": round(seconds, 1),
                **pre,
                "saved_bytes": mem["saved_bytes"],
                "grad_bytes": mem["grad_bytes"],
                "optimizer_bytes": mem["optimizer_bytes"],
                "training_bytes": mem["saved_bytes"] + mem["grad_bytes"] + mem["optimizer_bytes"],
                "trainable": mem["trainable"],
                "trainable_pct": mem["trainable_pct"],
            }
            runs.append(row)
            print(
                f"seed {seed} {label(method):<18} top-1 {100 * acc:6.2f} %  saved {row['saved_bytes'] / MIB:7.2f} MiB"
                f"  grad {row['grad_bytes'] / MIB:6.2f} MiB  optimizer {row['optimizer_bytes'] / MIB:6.2f} MiB  "
                f"trainable {row['trainable_pct']:6.2f} %  {seconds:5.0f} s",
                flush=True,
            )
            if args.out:  # after every run: a stopped run keeps what it finished (--resume goes on)
                write(Path(args.out), runs, args, time.perf_counter() - started)
    rows = summarize(runs)
    elapsed = time.perf_counter() - started
    print(table(rows))
    print(f"total {elapsed:.0f} s")
    if args.out:
        write(Path(args.out), runs, args, elapsed)
    if args.plot:
        plot(rows, Path(args.plot), plot_title(vars(args)))
    return rows


def plot_title(settings: dict) -> str:
    seeds = len(settings["seeds"])
    return (
        f"digits ViT pretrained {settings['epochs']} epochs upright; every method {settings['ft_epochs']} epochs on "
        f"90°-rotated digits (CPU, {seeds} seed{'s' if seeds != 1 else ''}{', mean ± std' if seeds > 1 else ''})"
    )


def replot(source: Path, path: Path) -> list[dict]:
    """The plot of an earlier ``--out`` JSON."""
    saved = json.loads(source.read_text())
    plot(saved["rows"], path, plot_title(saved["settings"]))
    return saved["rows"]


def write(path: Path, runs: list[dict], args: argparse.Namespace, seconds: float) -> None:
    """The JSON of the runs so far, their per-method summary and the settings."""
    settings = {k: v for k, v in vars(args).items() if k != "resume"}
    payload = {"rows": summarize(runs), "runs": runs, "settings": settings, "seconds": round(seconds, 1)}
    path.write_text(json.dumps(payload, indent=2))


def done_runs(path: Path, seeds: list[int], methods: list[str]) -> list[dict]:
    """The runs of ``path`` (an earlier ``--out``) that this call would repeat: same seeds' split."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    earlier = saved["settings"].get("seeds") or [None]
    if earlier[0] != seeds[0]:
        raise SystemExit(
            f"--resume: {path} was run with --seeds {earlier} (data split {earlier[0]}); this call's split is "
            f"{seeds[0]}: start a new --out"
        )
    return [r for r in saved["runs"] if r["seed"] in seeds and r["method"] in methods]


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method: accuracy mean and std over seeds; memory and counts of the first seed
    (they do not depend on the seed); ``start_accuracy`` averaged."""
    import statistics

    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [r for r in runs if r["method"] == method]
        accs = [r["accuracy"] for r in group]
        rows.append(
            {
                **group[0],
                "seeds": [r["seed"] for r in group],
                "accuracy": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "start_accuracy": statistics.fmean(r["start_accuracy"] for r in group),
                "train_seconds": statistics.fmean(r["train_seconds"] for r in group),
            }
        )
    return rows


def pm(row: dict) -> str:
    return f" ± {100 * row['accuracy_std']:.2f}" if len(row.get("seeds", [])) > 1 else ""


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["method"] == "full"), None)
    lines = [
        "| method | top-1 rotated | saved for backward MiB | .grad MiB | AdamW state MiB | sum MiB (× full) "
        "| trainable % | train time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f" ({r['training_bytes'] / full['training_bytes']:.3f}×)" if full else ""
        lines.append(
            f"| {label(r['method'])} | {100 * r['accuracy']:.2f}{pm(r)} % | {r['saved_bytes'] / MIB:.2f} | "
            f"{r['grad_bytes'] / MIB:.2f} | {r['optimizer_bytes'] / MIB:.2f} | "
            f"{r['training_bytes'] / MIB:.2f}{ratio} | {r['trainable_pct']:.2f} | {r['train_seconds']:.0f} s |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
