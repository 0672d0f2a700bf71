"""Digits-CLIP from scratch: AdamW vs GaLore after the same steps, then MeZO from the AdamW weights.

    python benchmarks/clip_digits.py results/clip_digits.json                 # ~6 epochs each, CPU
    python benchmarks/clip_digits.py out.json --epochs 10 --mezo-epochs 4 --mezo-lr 1e-4

The three runs are the repository's Hydra experiments (``configs/experiment/clip_finetune``,
``clip_galore``, ``clip_mezo``) composed with the overrides below, so each one is also
``vleff-train experiment=<name> trainer.max_epochs=<epochs> ...``. Steps:

1. ``clip_finetune`` (AdamW) trains the tiny open_clip CLIP on the digits image-text pairs; its
   weights are saved as a state dict (``<output stem>_adamw.pt``).
2. ``clip_galore`` trains the same model from the same seed for the same number of steps.
3. ``clip_mezo`` starts from the AdamW weights (``model.init_checkpoint``) and takes MeZO steps.

Reported per run (nothing is timed): validation retrieval Recall@1/5 both ways and zero-shot
accuracy (the digits' ten captions make image→text R@1 equal zero-shot accuracy), the
validation loss, the training loss over the whole training set in a fixed order (eval mode,
no dropout) before and after, the optimizer-state bytes and the number of steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _log(msg: str) -> None:
    print(f"[clip_digits {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose_experiment(name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from vleff.cli.train import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment={name}", *overrides])


@torch.no_grad()
def training_loss(module: Any, cfg: Any) -> float:
    """Mean contrastive loss over the whole training set, fixed order, eval mode."""
    from hydra.utils import instantiate

    from vleff.models.clip_finetuner import contrastive_loss

    dm = instantiate(cfg.data, shuffle=False)
    dm.setup("fit")
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in dm.train_dataloader():
        img, txt = module(batch["images"], batch["tokens"])
        total += float(contrastive_loss(img, txt, module.logit_scale, batch["caption_ids"])) * len(img)
        count += len(img)
    module.train(was_training)
    return total / count


def fit(cfg: Any) -> tuple[Any, Any, dict[str, float]]:
    """What ``vleff-train`` does for a CLIP experiment, keeping the module and trainer."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from vleff.cli.train import _instantiate_callbacks

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_callbacks(cfg.get("callbacks")))
    before = training_loss(module, cfg)
    trainer.fit(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["train_loss_before"] = before
    return module, trainer, metrics


def _row(name: str, module: Any, trainer: Any, metrics: dict[str, float], cfg: Any) -> dict[str, Any]:
    from vleff.profile import optimizer_state_bytes

    opt = trainer.optimizers[0]
    return {
        "name": name,
        "optimizer": type(opt).__name__,
        "steps": int(trainer.global_step),
        "i2t_R@1": metrics.get("val/i2t_R@1"),
        "t2i_R@1": metrics.get("val/t2i_R@1"),
        "i2t_R@5": metrics.get("val/i2t_R@5"),
        "t2i_R@5": metrics.get("val/t2i_R@5"),
        "zero_shot_acc": metrics.get("val/zero_shot_acc"),
        "val_loss": metrics.get("val/loss"),
        "train_loss_before": metrics["train_loss_before"],
        "train_loss_after": training_loss(module, cfg),
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "grad_tensors": sum(p.grad is not None for p in module.parameters()),
    }


def run_clip_digits(
    output: str | Path,
    epochs: int = 6,
    mezo_epochs: int = 2,
    mezo_lr: float = 1e-4,
    galore_rank: int = 16,
    extra_overrides: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the three experiments; returns one row each (AdamW, GaLore, MeZO)."""
    for key, value in (("epochs", epochs), ("mezo_epochs", mezo_epochs), ("galore_rank", galore_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r} is not allowed; use a positive int")
    if not mezo_lr > 0:
        raise ValueError(f"mezo_lr={mezo_lr!r} is not allowed; it must be > 0")
    output = Path(output)
    work = output.parent / f"{output.stem}_runs"
    work.mkdir(parents=True, exist_ok=True)
    common = [
        "trainer.logger=false",
        "trainer.enable_checkpointing=false",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        f"trainer.default_root_dir={work}",
        *(extra_overrides or []),
    ]
    rows = []

    _log(f"1/3 AdamW: experiment=clip_finetune, {epochs} epochs")
    cfg = compose_experiment("clip_finetune", [f"trainer.max_epochs={epochs}", *common])
    module, trainer, metrics = fit(cfg)
    rows.append(_row("AdamW", module, trainer, metrics, cfg))
    checkpoint = output.parent / f"{output.stem}_adamw.pt"
    torch.save(module.model.state_dict(), checkpoint)
    _log(f"AdamW: i2t R@1 {rows[-1]['i2t_R@1']:.3f}; weights saved to {checkpoint}")

    _log(f"2/3 GaLore: experiment=clip_galore rank {galore_rank}, {epochs} epochs")
    cfg = compose_experiment(
        "clip_galore", [f"trainer.max_epochs={epochs}", f"callbacks.galore.rank={galore_rank}", *common]
    )
    module, trainer, metrics = fit(cfg)
    rows.append(_row(f"GaLore r={galore_rank}", module, trainer, metrics, cfg))
    _log(f"GaLore: i2t R@1 {rows[-1]['i2t_R@1']:.3f}")

    _log(f"3/3 MeZO: experiment=clip_mezo from the AdamW weights, lr {mezo_lr}, {mezo_epochs} epochs")
    cfg = compose_experiment(
        "clip_mezo",
        [
            f"trainer.max_epochs={mezo_epochs}",
            f"callbacks.mezo.lr={mezo_lr}",
            f"model.init_checkpoint={checkpoint}",
            *common,
        ],
    )
    module, trainer, metrics = fit(cfg)
    rows.append(_row("MeZO from AdamW", module, trainer, metrics, cfg))
    _log(
        f"MeZO: train loss {rows[-1]['train_loss_before']:.4f} -> {rows[-1]['train_loss_after']:.4f}, "
        f"i2t R@1 {rows[-1]['i2t_R@1']:.3f}"
    )
    rows[-1]["i2t_R@1_before"] = rows[0]["i2t_R@1"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file for the rows (runs and the AdamW weights go next to it)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of AdamW and of GaLore (22 steps each)")
    parser.add_argument("--mezo-epochs", type=int, default=2)
    parser.add_argument("--mezo-lr", type=float, default=1e-4)
    parser.add_argument("--galore-rank", type=int, default=16)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for all three runs, e.g. seed=1")
    args = parser.parse_args(argv)
    rows = run_clip_digits(args.output, args.epochs, args.mezo_epochs, args.mezo_lr, args.galore_rank, args.overrides)
    from vleff.profile import print_table, rows_to_json

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"

    table = [
        {
            "name": r["name"],
            "steps": r["steps"],
            "i2t": pct(r["i2t_R@1"]),
            "t2i": pct(r["t2i_R@1"]),
            "zs": pct(r["zero_shot_acc"]),
            "loss": f"{r['train_loss_before']:.4f} -> {r['train_loss_after']:.4f}",
            "state": f"{r['optimizer_state_bytes'] / 2**20:.2f}",
        }
        for r in rows
    ]
    print_table(
        table,
        title="Digits-CLIP (from scratch; MeZO from the AdamW weights)",
        extra_columns={
            "steps": "steps",
            "i2t": "i2t R@1 %",
            "t2i": "t2i R@1 %",
            "zs": "zero-shot %",
            "loss": "train loss before -> after",
            "state": "opt. state MiB",
        },
    )
    path = rows_to_json(
        rows,
        args.output,
        benchmark="clip_digits",
        command=" ".join(["python", *sys.argv]),
        epochs=args.epochs,
        mezo_epochs=args.mezo_epochs,
        mezo_lr=args.mezo_lr,
        galore_rank=args.galore_rank,
        threads=torch.get_num_threads(),
    )
    _log(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
