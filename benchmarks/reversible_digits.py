"""Reversible blocks on digits: Rev-ViT from scratch vs the plain ViT; MEFT fine-tuning vs full fine-tuning.

    python benchmarks/reversible_digits.py [--epochs 25] [--ft-epochs 5] [--ft-seeds 0,1,2]
        [--variants full,meft,meft-balance,meft-balance-peft] [--out reversible_digits.json]

The 6-block digits ViT (``vit_tiny_digits``: 128 wide, 65 tokens; the bundled 8x8 digits at
32 px, 360 validation images), the recipe of ``benchmarks/pareto_digits.py`` (AdamW, warm-up
and cosine, batch 64), every run seeded, on the CPU:

1. **from scratch**: the plain ViT and the same ViT with ``Reversible(coupling="revvit")``
   (RevNet couplings; fused output ``(y1 + y2) / 2`` into timm's norm and head), ``--epochs``
   epochs each from the same initial weights (``--seed``);
2. **fine-tuning** the trained plain ViT for ``--ft-epochs`` more epochs at ``--ft-lr`` (the same
   epochs, learning rate and schedule for every variant), once per fine-tuning seed
   (``--ft-seeds``: the adapters, and with ``--ft-shuffle`` the batch order; the pretrained
   weights are the same): ``full``
   (plain full fine-tuning, the reference), and ``Reversible(coupling="meft")`` (λ = β = 1,
   adapters of bottleneck 8, float64 streams) training every parameter (``meft``; with
   ``balance=True``: ``meft-balance``) or MEFT's parameter-efficient set, adapters, norms and
   head only (``meft-peft``, ``meft-balance-peft``). The MEFT network is a different function
   of the pretrained weights (its starting gap), so the starting accuracy is reported too.

Top-1 is measured in eval mode on the validation split (the reversible networks through the
reversible stack, as they were trained); nothing is selected on it. ``--save-pretrained`` /
``--load-pretrained`` reuse one pretraining across invocations (same ``--seed`` and ``--epochs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import torch


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=message)


def _freeze_all_but_meft_set():
    """A callback (after ``Reversible`` in the list, so the adapters exist) leaving only MEFT's
    parameter-efficient set trainable: adapters, norms and the head."""
    import lightning.pytorch as pl

    class FreezeBackbone(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            for name, p in pl_module.named_parameters():
                p.requires_grad_("vleff_reversible" in name or "norm" in name or ".head." in name)

    return FreezeBackbone()


FINETUNE = ("full", "meft", "meft-balance", "meft-balance-peft", "meft-peft")
TITLES = {
    "full": "full fine-tuning (plain)",
    "meft": "MEFT fine-tuning, all parameters",
    "meft-balance": "MEFT balance=True, all parameters",
    "meft-balance-peft": "MEFT balance=True, adapters+norms+head",
    "meft-peft": "MEFT fine-tuning, adapters+norms+head",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--ft-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0, help="data split, initial weights, pretraining")
    parser.add_argument("--ft-seeds", default="0", help="comma-separated fine-tuning seeds (adapters, batch order)")
    parser.add_argument(
        "--variants", default=",".join(FINETUNE[:4]), help=f"comma-separated fine-tuning variants among {FINETUNE}"
    )
    parser.add_argument(
        "--ft-shuffle",
        action="store_true",
        help="the fine-tuning seed also draws the batch order (default: the --seed order, so "
        "full fine-tuning is the same for every fine-tuning seed)",
    )
    parser.add_argument("--no-scratch-revvit", action="store_true", help="skip the Rev-ViT from-scratch run")
    parser.add_argument("--save-pretrained", default=None, help="write the plain ViT's trained weights here")
    parser.add_argument(
        "--load-pretrained",
        default=None,
        help="fine-tune these weights (a --save-pretrained file of the same --seed and --epochs) "
        "instead of training the plain ViT again; implies --no-scratch-revvit",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in FINETUNE]
    if bad:
        parser.error(f"--variants: {bad[0]!r} is not one of {FINETUNE}")
    ft_seeds = [int(v) for v in args.ft_seeds.split(",")]
    _quiet()
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from vleff.callbacks import Reversible
    from vleff.cli.evaluate import accuracy
    from vleff.data import DigitsDataModule
    from vleff.methods.reversible.core import apply_reversible, remove_reversible
    from vleff.models import ImageClassifier

    class Digits(DigitsDataModule):
        """The split of ``--seed``; training batches in the order of ``shuffle_seed`` when set."""

        shuffle_seed: int | None = None

        def train_dataloader(self):
            if self.shuffle_seed is None:
                return super().train_dataloader()
            from torch.utils.data import DataLoader

            return DataLoader(
                self.train_set,
                batch_size=self.batch_size,
                shuffle=True,
                collate_fn=self._shift,
                generator=torch.Generator().manual_seed(self.shuffle_seed),
            )

    datamodule = Digits(image_size=32, batch_size=64, seed=args.seed)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())

    def new(lr: float, state: dict | None = None) -> ImageClassifier:
        pl.seed_everything(args.seed, verbose=False)
        module = ImageClassifier("vit_tiny_digits", num_classes=10, image_size=32, lr=lr)
        if state is not None:
            module.load_state_dict(state)
        return module

    def fit(module: ImageClassifier, epochs: int, callbacks: list, seed: int, shuffle: bool = False) -> float:
        pl.seed_everything(seed + 1, verbose=False)
        datamodule.shuffle_seed = 1000 + seed if shuffle else None
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        return time.perf_counter() - start

    rows = []

    def report(name: str, module: ImageClassifier, seconds: float, **extra) -> None:
        row = {
            "variant": name,
            "accuracy": accuracy(module.eval(), batches),
            "train_seconds": round(seconds, 1),
            "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            **extra,
        }
        rows.append(row)
        print(
            f"{name:<40} top-1 {100 * row['accuracy']:6.2f}%  {row['train_seconds']:7.1f} s  "
            f"{row['trainable']:>8} trainable" + "".join(f"  {k} {v}" for k, v in extra.items()),
            flush=True,
        )

    if args.load_pretrained:
        pretrained = torch.load(args.load_pretrained, weights_only=True)
        print(
            f"pretrained weights from {args.load_pretrained}: top-1 "
            f"{100 * accuracy(new(args.lr, pretrained).eval(), batches):.2f}%",
            flush=True,
        )
    else:
        plain = new(args.lr)
        report("plain ViT (scratch)", plain, fit(plain, args.epochs, [], args.seed))
        if not args.no_scratch_revvit:
            rev = new(args.lr)
            report("Rev-ViT revvit (scratch)", rev, fit(rev, args.epochs, [Reversible(coupling="revvit")], args.seed))
        pretrained = {k: v.clone() for k, v in plain.state_dict().items()}
        if args.save_pretrained:
            torch.save(pretrained, args.save_pretrained)

    for seed in ft_seeds:
        for variant in variants:
            module = new(args.ft_lr, pretrained)
            if variant == "full":
                report(TITLES[variant], module, fit(module, args.ft_epochs, [], seed, args.ft_shuffle), ft_seed=seed)
                continue
            settings = {"coupling": "meft", "balance": "balance" in variant}
            torch.manual_seed(seed)
            apply_reversible(module, **settings)
            start_acc = accuracy(module.eval(), batches)  # the starting gap, in accuracy
            remove_reversible(module)
            module.train()  # Lightning keeps the modes it finds
            extra = [_freeze_all_but_meft_set()] if variant.endswith("peft") else []
            seconds = fit(module, args.ft_epochs, [Reversible(**settings), *extra], seed, args.ft_shuffle)
            report(TITLES[variant], module, seconds, ft_seed=seed, start_accuracy=round(start_acc, 4))

    summary = {}
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(100 * r["accuracy"])
    for name, values in by.items():
        t = torch.tensor(values, dtype=torch.float64)
        summary[name] = {
            "mean": round(float(t.mean()), 2),
            "std": round(float(t.std()), 2) if len(values) > 1 else 0.0,
            "runs": values,
        }
    if "full" in variants:
        full = torch.tensor(by[TITLES["full"]], dtype=torch.float64)
        for variant in variants[1:] if variants[0] == "full" else variants:
            if variant != "full":
                diff = torch.tensor(by[TITLES[variant]], dtype=torch.float64) - full  # paired by fine-tuning seed
                summary[f"{variant}_minus_full_points"] = {
                    "mean": round(float(diff.mean()), 2),
                    "per_seed": [round(float(d), 2) for d in diff],
                }
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary, "settings": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
