"""Digits-CLIP with MADTP at <= 0.6x image-tower FLOPs: off the shelf and fine-tuned, against AdamW.

    python benchmarks/clip_digits_madtp.py out/clip_digits_madtp.json
    python benchmarks/clip_digits_madtp.py out.json --epochs 6 --ft-epochs 2 --flops-reduction 0.4

1. ``clip_finetune`` (AdamW, the repository's experiment) trains the tiny open_clip CLIP on the
   digits image-text pairs from scratch (``--epochs``); validation R@1 is the baseline.
2. **Off the shelf**: MADTP applied to those weights (random codebook: nothing trained), τ
   calibrated on two training batches so the *image tower's* measured FLOPs are
   ``1 − flops_reduction`` of its baseline (``measure="image"``), then validated.
3. **Fine-tuned**: ``clip_finetune`` + ``callbacks=[madtp]`` (``measure=image``) from the AdamW
   weights for ``--ft-epochs`` (the callback calibrates τ before training and after each epoch
   and adds the alignment loss), then validated.

FLOPs are counted per sample (the first 16 samples, one at a time): MADTP's samples keep
different numbers of tokens, and a 64-image batch costs its maximum keep count, which stays
near the full length whatever τ is (the reference's batch maximum has the same cost).
Reported: image→text / text→image R@1, and the image tower's per-sample FLOPs ratio measured
on 16 validation samples after each run (``vleff.profile`` via :func:`vleff.tokens.madtp.measure_flops`).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clip_digits import _log, compose_experiment, fit  # noqa: E402

SAMPLES = 16  # FLOPs are per sample (batch 1): a 64-image batch costs its maximum keep count


def _validate(module, cfg) -> dict[str, float]:
    from hydra.utils import instantiate

    trainer = instantiate(cfg.trainer, callbacks=[])
    out = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def _image_ratio(module, cfg) -> float:
    from hydra.utils import instantiate

    from vleff.tokens.madtp import _pair_and_module, image_forward, measure_flops, single_samples

    dm = instantiate(cfg.data, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    batches = single_samples([(batch["images"], batch["tokens"])], SAMPLES)
    _, madtp = _pair_and_module(module.model)
    madtp.enabled = False
    base = measure_flops(module.model, batches, image_forward)
    madtp.enabled = True
    return measure_flops(module.model, batches, image_forward) / base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--ft-epochs", type=int, default=2)
    parser.add_argument("--flops-reduction", type=float, default=0.4)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. data.train_limit=64)")
    args = parser.parse_intermixed_args()
    from hydra.utils import instantiate

    import vleff

    output = Path(args.output)
    work = output.parent / f"{output.stem}_runs"
    work.mkdir(parents=True, exist_ok=True)
    common = ["trainer.logger=false", "trainer.enable_checkpointing=false", "++trainer.enable_progress_bar=false",
              "++trainer.enable_model_summary=false", f"trainer.default_root_dir={work}", *args.overrides]
    rows = []
    _log(f"1/3 AdamW: clip_finetune, {args.epochs} epochs")
    cfg = compose_experiment("clip_finetune", [f"trainer.max_epochs={args.epochs}", *common])
    module, trainer, metrics = fit(cfg)
    rows.append({"run": "AdamW baseline", "i2t_R@1": metrics.get("val/i2t_R@1"), "t2i_R@1": metrics.get("val/t2i_R@1"),
                 "image_flops_ratio": 1.0, "steps": int(trainer.global_step)})
    weights = work / "adamw.pt"
    torch.save(module.model.state_dict(), weights)
    _log(json.dumps(rows[-1]))

    _log(f"2/3 off the shelf: MADTP at {1 - args.flops_reduction:.2f}x image FLOPs")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    batches = [(b["images"], b["tokens"]) for b, _ in zip(loader, range(2))]
    vleff.apply_madtp(module.model, flops_reduction=args.flops_reduction)
    from vleff.tokens.madtp import image_forward

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        cal = vleff.calibrate_madtp(module.model, batches, forward=image_forward, samples=SAMPLES)
    val = _validate(module, cfg)
    rows.append({"run": "MADTP off the shelf", "i2t_R@1": val.get("val/i2t_R@1"), "t2i_R@1": val.get("val/t2i_R@1"),
                 "image_flops_ratio": _image_ratio(module, cfg), "calibrated_ratio": cal.ratio, "tau": cal.tau,
                 "warnings": [str(w.message) for w in caught]})
    _log(json.dumps(rows[-1]))

    _log(f"3/3 fine-tuned: clip_finetune + madtp from the AdamW weights, {args.ft_epochs} epochs")
    cfg = compose_experiment("clip_finetune", [
        f"trainer.max_epochs={args.ft_epochs}", "callbacks=[madtp]", f"callbacks.madtp.flops_reduction={args.flops_reduction}",
        "callbacks.madtp.measure=image", f"callbacks.madtp.samples={SAMPLES}", f"model.init_checkpoint={weights}", *common])
    module, trainer, metrics = fit(cfg)
    history = next(c for c in trainer.callbacks if type(c).__name__ == "MADTP").controller.history
    rows.append({"run": "MADTP fine-tuned", "i2t_R@1": metrics.get("val/i2t_R@1"), "t2i_R@1": metrics.get("val/t2i_R@1"),
                 "image_flops_ratio": _image_ratio(module, cfg), "steps": int(trainer.global_step),
                 "controller_history": history})
    _log(json.dumps(rows[-1]))
    output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
