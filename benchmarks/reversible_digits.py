"""Reversible blocks on digits: Rev-ViT from scratch vs the plain ViT; MEFT fine-tuning vs full fine-tuning.

    python benchmarks/reversible_digits.py [--epochs 25] [--ft-epochs 5] [--out reversible_digits.json]

The 6-block digits ViT (``vit_tiny_digits``: 128 wide, 65 tokens; the bundled 8x8 digits at
32 px, 360 validation images), the recipe of ``benchmarks/pareto_digits.py`` (AdamW, warm-up
and cosine, batch 64), every run seeded, on the CPU:

1. **from scratch**: the plain ViT and the same ViT with ``Reversible(coupling="revvit")``
   (RevNet couplings; fused output ``(y1 + y2) / 2`` into timm's norm and head), ``--epochs``
   epochs each from the same initial weights;
2. **fine-tuning** the trained plain ViT for ``--ft-epochs`` more epochs: plainly (full
   fine-tuning, the reference), and with ``Reversible(coupling="meft")`` (its defaults: λ = β
   = 1, adapters of bottleneck 8, float64 streams) training (a) every parameter, (b) MEFT's
   parameter-efficient set: adapters, norms and head only. The MEFT network is a different
   function of the pretrained weights (its starting gap), so the starting accuracy is reported too.

Top-1 is measured in eval mode on the validation split (the reversible networks through the
reversible stack, as they were trained).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--ft-epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    _quiet()
    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    from vleff.callbacks import Reversible
    from vleff.cli.evaluate import accuracy
    from vleff.data import DigitsDataModule
    from vleff.models import ImageClassifier

    datamodule = DigitsDataModule(image_size=32, batch_size=64, seed=args.seed)
    datamodule.setup("fit")
    batches = list(datamodule.val_dataloader())

    def new(lr: float, state: dict | None = None) -> ImageClassifier:
        pl.seed_everything(args.seed, verbose=False)
        module = ImageClassifier("vit_tiny_digits", num_classes=10, image_size=32, lr=lr)
        if state is not None:
            module.load_state_dict(state)
        return module

    def fit(module: ImageClassifier, epochs: int, callbacks: list) -> float:
        pl.seed_everything(args.seed + 1, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(module, datamodule=datamodule)
        return time.perf_counter() - start

    rows = []

    def report(name: str, module: ImageClassifier, seconds: float, **extra) -> None:
        row = {"variant": name, "accuracy": accuracy(module.eval(), batches), "train_seconds": round(seconds, 1),
               "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad), **extra}
        rows.append(row)
        print(f"{name:<40} top-1 {100 * row['accuracy']:6.2f}%  {row['train_seconds']:7.1f} s  "
              f"{row['trainable']:>8} trainable" + "".join(f"  {k} {v}" for k, v in extra.items()), flush=True)

    plain = new(args.lr)
    report("plain ViT (scratch)", plain, fit(plain, args.epochs, []))
    rev = new(args.lr)
    report("Rev-ViT revvit (scratch)", rev, fit(rev, args.epochs, [Reversible(coupling="revvit")]))

    pretrained = {k: v.clone() for k, v in plain.state_dict().items()}
    full = new(args.ft_lr, pretrained)
    report("full fine-tuning (plain)", full, fit(full, args.ft_epochs, []))
    for name, extra in (("MEFT fine-tuning, all parameters", []),
                        ("MEFT fine-tuning, adapters+norms+head", [_freeze_all_but_meft_set()])):
        module = new(args.ft_lr, pretrained)
        from vleff.memory.reversible import apply_reversible, remove_reversible

        torch.manual_seed(args.seed)
        apply_reversible(module)
        start_acc = accuracy(module.eval(), batches)  # the starting gap, in accuracy
        remove_reversible(module)
        module.train()  # Lightning keeps the modes it finds
        seconds = fit(module, args.ft_epochs, [Reversible(coupling="meft"), *extra])
        report(name, module, seconds, start_accuracy=round(start_acc, 4))

    by = {r["variant"]: r["accuracy"] for r in rows}
    summary = {"revvit_minus_plain_points": 100 * (by["Rev-ViT revvit (scratch)"] - by["plain ViT (scratch)"]),
               "meft_all_minus_full_points": 100 * (by["MEFT fine-tuning, all parameters"]
                                                    - by["full fine-tuning (plain)"]),
               "meft_peft_minus_full_points": 100 * (by["MEFT fine-tuning, adapters+norms+head"]
                                                     - by["full fine-tuning (plain)"])}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "summary": summary, "settings": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
