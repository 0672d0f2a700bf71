"""Digits-CLIP with the token methods at <= 0.6x image-tower FLOPs: off the shelf and fine-tuned.

    python benchmarks/clip_digits_tokens.py out/clip_digits_tokens.json             # everything, ~5 min, 1 thread
    python benchmarks/clip_digits_tokens.py out.json --methods crossget --baseline-weights out/..._runs/baseline.pt
    python benchmarks/clip_digits_tokens.py out.json --methods madtp --madtp-set 'locations=[2,3,4,5]' --ft-lr 1e-3

The model is the repository's tiny open_clip digits CLIP (``configs/model/clip_digits.yaml``)
made longer and deeper for this benchmark (``--layers 6 --patch-size 4``: 65 image tokens and
6 blocks per tower instead of 17 tokens and 2 blocks): with 2 blocks of 17 tokens no token
method reaches 0.6x of the image tower's FLOPs (there is too little left to merge or prune
after the patch embedding and the first block). The baseline is trained with exactly these
overrides, so every row shares the architecture.

1. **Baseline**: ``clip_finetune`` (AdamW, the repository's experiment) from scratch for
   ``--epochs`` on the digits image-text pairs (skipped with ``--baseline-weights``).
2. **Control**: the same weights fine-tuned ``--ft-epochs`` more with the fine-tuning
   schedule below and no method: what the extra epochs alone do.
3. Per method (``--methods``), on the baseline's weights:

   * **off the shelf**: applied to the trained weights, nothing trained. CrossGET: the
     smallest ``r_image`` whose measured image-tower FLOPs are ``<= 1 − flops_reduction`` of the
     baseline (``--r-image`` to fix it). MADTP: random codebook, τ calibrated on two training
     batches (per-sample FLOPs of their first ``--madtp-samples`` (16) samples, image tower, ``measure="image"``).
     The controller is asked for ``flops_reduction + --madtp-margin`` (0.02): the target holds
     on the calibration samples, and a validation image's keep count scatters around it.
   * **fine-tuned**: ``clip_finetune`` + ``callbacks=[crossget]`` / ``[madtp]`` from the
     baseline's weights for ``--ft-epochs`` (``model.lr=--ft-lr``, ``--ft-warmup`` warm-up
     steps, cosine decay); the callbacks add their alignment losses; MADTP's controller
     calibrates τ before training and after every epoch (``--madtp-warmup W``: the
     reduction trained at ramps linearly to the target over the first W epochs, as the
     reference's τ steps do; the last epochs and the evaluated model are at the target).
     MADTP's fine-tuned row is validated again after training: Lightning's last validation
     runs before the controller's last re-calibration, so its R@1 would be of the τ before it
     (kept in the row as ``last_epoch_i2t_R1``) while the FLOPs are of the final τ.

DynamicViT, Transkimmer and MuE (``CALLBACK_METHODS``) are fine-tuned with their own callbacks at
``flops_target = 1 − flops_reduction`` and ``budget_tower="image"`` (the image tower's FLOPs, as
the column); DynamicViT without distillation (its teacher loss reads class logits), Transkimmer
with skim coefficient 0.1 (as ``budget_digits.py``), MuE with its layer-wise loss (for CLIP the
contrastive loss of every exit's embedding, :mod:`vleff.methods.mue.contrastive`) and also off the
shelf. Transkimmer's and MuE's thresholds are fitted again
after training on the ``--budget-samples`` training images one at a time, and the row is validated
again at that threshold.

By default only the image tower is reduced (``r_text=0``; MADTP ``towers=image``), so text
embeddings are computed at full cost in every row and the FLOPs figure is of the image tower;
both methods still use the text tower for guidance in training (CrossGET's JS loss between the
cross tokens, MADTP's shared codebook and alignment loss).

``benchmarks/plot_clip_digits_tokens.py`` draws the output files of several seeds on one picture.

Reported per row: image→text and text→image R@1 on the 360 validation pairs (with ten distinct
captions image→text R@1 equals zero-shot accuracy), and the image tower's FLOPs ratio measured by
:mod:`vleff.profile` on the first ``--flops-samples`` validation images one at a time (MADTP
keeps a different number of tokens per image: the ratio is the mean per-sample cost; a batch
costs its largest keep count). Nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clip_digits import _log, compose_experiment, fit  # noqa: E402

#: the single-tower token methods compared at the same image-tower budget: name -> (label, the
#: settings applied before :func:`vleff.fit_budget` sets the knob, the knob's callback fields)
BUDGET_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "tome": ("ToMe", {"r": 0}),
    "turbo": ("Turbo", {"r": 0}),
    "evit": ("EViT", {"keep_rate": 1.0, "locations": [1, 3, 4]}),
}
#: the token methods whose knob their own callback fits (``flops_target`` with
#: ``budget_tower="image"``): name -> (label, the callback's settings, the settings applied off the
#: shelf before :func:`vleff.fit_budget` or ``None`` (needs training), data-dependent knob). A
#: data-dependent knob (Transkimmer's keep threshold, MuE's exit threshold) is fitted again after
#: fine-tuning on the training images one at a time, as the FLOPs column counts them: Transkimmer's
#: batched inference runs as many tokens as the batch's widest sample keeps, so the callback's fit on
#: whole training batches would leave each image skimming more than the budget asks.
CALLBACK_METHODS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None, bool]] = {
    "dynamicvit": ("DynamicViT", {"locations": [1, 3, 4], "distill": False}, None, False),
    "transkimmer": ("Transkimmer", {"towers": "image", "skim_coefficient": 0.1}, None, True),
    "mue": (
        "MuE",
        {"towers": "image", "image_threshold": 1.0, "layerwise_loss": True},
        {"towers": "image", "image_threshold": 1.0},
        True,
    ),
}
METHODS = ("crossget", "madtp", *BUDGET_METHODS, *CALLBACK_METHODS)


def _validate(module: Any, cfg: Any) -> dict[str, float]:
    from hydra.utils import instantiate

    trainer = instantiate(cfg.trainer, callbacks=[])
    out = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]
    return {k: float(v) for k, v in out.items()}


def _samples(cfg: Any, split: str, count: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``count`` samples of a split (fixed order), each as a batch of one."""
    from hydra.utils import instantiate

    from vleff.methods.madtp.core import single_samples

    dm = instantiate(cfg.data, shuffle=False)
    dm.setup("fit")
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    return single_samples(((b["images"], b["tokens"]) for b in loader), count)


def image_flops(model: Any, samples: list[tuple[torch.Tensor, ...]]) -> int:
    """Image-tower FLOPs (``vleff.profile``, eval, no grad) summed over ``samples``."""
    from vleff.methods.madtp.core import image_forward, measure_flops

    return measure_flops(model, samples, image_forward)


def smallest_r(model: Any, samples: list[tuple[torch.Tensor, ...]], ratio: float, r_text: int) -> tuple[int, float]:
    """The smallest CrossGET ``r_image`` whose measured image FLOPs are ``<= ratio × baseline``."""
    import vleff

    one = samples[:1]  # CrossGET's image schedule does not depend on the image
    base = image_flops(model, one)
    for r in range(1, 64):
        vleff.apply_crossget(model, r_image=r, r_text=r_text)
        try:
            got = image_flops(model, one) / base
        finally:
            vleff.remove_crossget(model)
        if got <= ratio:
            return r, got
    raise ValueError(f"no r_image in 1..63 brings the image tower to {ratio:.2f}x its FLOPs")


def _encode_image(model: Any, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The open_clip model's image tower alone on a ``(images, tokens)`` sample: the budget is of
    the image tower, as the FLOPs column."""
    return model.encode_image(batch[0])


def _row(run: str, metrics: dict[str, float], ratio: float, **extra: Any) -> dict[str, Any]:
    return {
        "run": run,
        "image_flops_ratio": ratio,
        "i2t_R@1": metrics.get("val/i2t_R@1"),
        "t2i_R@1": metrics.get("val/t2i_R@1"),
        "zero_shot_acc": metrics.get("val/zero_shot_acc"),
        **extra,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from hydra.utils import instantiate

    import vleff
    from vleff.methods.madtp.core import image_forward

    output = Path(args.output)
    work = output.parent / f"{output.stem}_runs"
    work.mkdir(parents=True, exist_ok=True)
    arch = [
        f"model.model_kwargs.layers={args.layers}",
        f"model.model_kwargs.patch_size={args.patch_size}",
        f"model.model_kwargs.width={args.width}",
    ]
    common = [
        "trainer.logger=false",
        "trainer.enable_checkpointing=false",
        "++trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        f"trainer.default_root_dir={work}",
        *arch,
        *args.overrides,
    ]
    finetune = [
        f"trainer.max_epochs={args.ft_epochs}",
        f"model.lr={args.ft_lr}",
        f"model.warmup_steps={args.ft_warmup}",
    ]
    target = 1.0 - args.flops_reduction
    rows: list[dict[str, Any]] = []

    cfg = compose_experiment("clip_finetune", [f"trainer.max_epochs={args.epochs}", *common])
    if args.baseline_weights is None:
        _log(f"baseline: clip_finetune {args.epochs} epochs, {args.layers} blocks, patch {args.patch_size}")
        module, trainer, metrics = fit(cfg)
        weights = work / "baseline.pt"
        torch.save(module.model.state_dict(), weights)
        steps = int(trainer.global_step)
    else:
        weights = Path(args.baseline_weights)
        module = instantiate(cfg.model, init_checkpoint=str(weights))
        metrics, steps = _validate(module, cfg), None
    val_samples = _samples(cfg, "val", args.flops_samples)
    base_flops = image_flops(module.model, val_samples)
    rows.append(
        _row(
            f"baseline ({args.epochs} epochs)",
            metrics,
            1.0,
            steps=steps,
            weights=str(weights),
            image_gflops_per_sample=base_flops / len(val_samples) / 1e9,
        )
    )
    _log(json.dumps(rows[-1]))

    def measured(model: Any) -> float:
        return image_flops(model, val_samples) / base_flops

    def fine_tune(name: str, callbacks: list[str]) -> tuple[Any, Any, dict[str, float]]:
        _log(f"{name}: clip_finetune from the baseline weights, {args.ft_epochs} epochs, lr {args.ft_lr}")
        over = [*finetune, f"model.init_checkpoint={weights}", *common, *callbacks]
        return fit(compose_experiment("clip_finetune", over))

    if args.control:
        _, trainer_c, metrics_c = fine_tune("control", [])
        rows.append(
            _row(f"baseline + {args.ft_epochs} epochs, no method", metrics_c, 1.0, steps=int(trainer_c.global_step))
        )
        _log(json.dumps(rows[-1]))

    if "crossget" in args.methods:
        r = args.r_image
        if r is None:
            r, _ = smallest_r(module.model, val_samples, target, args.r_text)
        off = compose_experiment("clip_finetune", [*common])
        fresh = instantiate(off.model, init_checkpoint=str(weights))
        vleff.apply_crossget(fresh.model, r_image=r, r_text=args.r_text)
        rows.append(
            _row(
                f"CrossGET r_image={r} r_text={args.r_text}, off the shelf",
                _validate(fresh, off),
                measured(fresh.model),
                r_image=r,
                r_text=args.r_text,
            )
        )
        _log(json.dumps(rows[-1]))
        module_f, trainer_f, metrics_f = fine_tune(
            "CrossGET",
            ["callbacks=[crossget]", f"callbacks.crossget.r_image={r}", f"callbacks.crossget.r_text={args.r_text}"],
        )
        rows.append(
            _row(
                f"CrossGET r_image={r} r_text={args.r_text}, fine-tuned {args.ft_epochs} epochs",
                metrics_f,
                measured(module_f.model),
                steps=int(trainer_f.global_step),
                r_image=r,
                r_text=args.r_text,
            )
        )
        _log(json.dumps(rows[-1]))

    train_samples = _samples(cfg, "train", args.budget_samples)
    for name in (m for m in args.methods if m in BUDGET_METHODS):
        label, start = BUDGET_METHODS[name]
        off = compose_experiment("clip_finetune", [*common])
        fresh = instantiate(off.model, init_checkpoint=str(weights))
        getattr(vleff, f"apply_{name}")(fresh.model, towers="image", **start)
        fitted = vleff.fit_budget(fresh.model, train_samples, flops=target, method=name, forward=_encode_image)
        knob = {k: v for k, v in fitted.settings.items() if k in ("r", "keep_rate")}
        shown = " ".join(f"{k}={v}" for k, v in knob.items())
        rows.append(
            _row(
                f"{label} {shown}, off the shelf (fit_budget on {len(train_samples)} training images)",
                _validate(fresh, off),
                measured(fresh.model),
                fitted_ratio=fitted.ratio,
                **knob,
            )
        )
        _log(json.dumps(rows[-1]))
        extra = [f"callbacks.{name}.{k}={_hydra_value(v)}" for k, v in knob.items()]
        if name == "evit":  # the keep rate at the fitted value from the first step (no cosine ramp)
            extra += [f"callbacks.evit.locations={_hydra_value(start['locations'])}", "callbacks.evit.end_epoch=0"]
        module_f, trainer_f, metrics_f = fine_tune(
            label, [f"callbacks=[{name}]", f"callbacks.{name}.towers=image", *extra]
        )
        rows.append(
            _row(
                f"{label} {shown}, fine-tuned {args.ft_epochs} epochs",
                metrics_f,
                measured(module_f.model),
                steps=int(trainer_f.global_step),
                **knob,
            )
        )
        _log(json.dumps(rows[-1]))

    for name in (m for m in args.methods if m in CALLBACK_METHODS):
        label, settings, shelf, data_dependent = CALLBACK_METHODS[name]
        off = compose_experiment("clip_finetune", [*common])
        if shelf is not None:
            fresh = instantiate(off.model, init_checkpoint=str(weights))
            getattr(vleff, f"apply_{name}")(fresh.model, **shelf)
            fitted = vleff.fit_budget(
                fresh.model, train_samples, flops=target, method=name, forward=_encode_image, strict=False
            )
            rows.append(
                _row(
                    f"{label}, off the shelf (fit_budget on {len(train_samples)} training images)",
                    _validate(fresh, off),
                    measured(fresh.model),
                    fitted_ratio=fitted.ratio,
                    settings=fitted.settings,
                )
            )
            _log(json.dumps(rows[-1], default=str))
        over = [f"callbacks=[{name}]", *(f"++callbacks.{name}.{k}={_hydra_value(v)}" for k, v in settings.items())]
        over += [f"++callbacks.{name}.flops_target={target}", f"++callbacks.{name}.budget_tower=image"]
        module_f, trainer_f, metrics_f = fine_tune(label, over)
        fitted_ratio = None
        applied = {}
        if data_dependent:  # fitted again per image on the trained weights, then validated again
            fitted = vleff.fit_budget(
                module_f.model, train_samples, flops=target, method=name, forward=_encode_image, strict=False
            )
            fitted_ratio, applied = fitted.ratio, fitted.settings
            metrics_f = _validate(module_f, off)
        else:
            from vleff.registry import get_method

            applied = get_method(name).applied_settings(module_f.model)
        rows.append(
            _row(
                f"{label} (flops_target={target}, budget_tower=image), fine-tuned {args.ft_epochs} epochs",
                metrics_f,
                measured(module_f.model),
                steps=int(trainer_f.global_step),
                fitted_ratio=fitted_ratio,
                settings={k: v for k, v in applied.items() if not isinstance(v, torch.Tensor)},
            )
        )
        _log(json.dumps(rows[-1], default=str))

    if "madtp" in args.methods:
        madtp_reduction = round(args.flops_reduction + args.madtp_margin, 6)

        off = compose_experiment("clip_finetune", [*common])
        fresh = instantiate(off.model, init_checkpoint=str(weights))
        torch.manual_seed(off.seed)  # the random codebook and projections: the same draw on every invocation
        vleff.apply_madtp(fresh.model, flops_reduction=madtp_reduction, towers=args.madtp_towers, **args.madtp_set)
        calib = _samples(off, "train", args.madtp_samples)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            cal = vleff.calibrate_madtp(fresh.model, calib, forward=image_forward)
        rows.append(
            _row(
                f"MADTP towers={args.madtp_towers}{_settings(args.madtp_set)}, off the shelf (random codebook)",
                _validate(fresh, off),
                measured(fresh.model),
                tau=cal.tau,
                start=cal.start,
                calibrated_ratio=cal.ratio,
                warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            )
        )
        _log(json.dumps(rows[-1]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            module_f, trainer_f, metrics_f = fine_tune(
                "MADTP",
                [
                    "callbacks=[madtp]",
                    f"callbacks.madtp.flops_reduction={madtp_reduction}",
                    "callbacks.madtp.measure=image",
                    f"callbacks.madtp.samples={args.madtp_samples}",
                    f"callbacks.madtp.towers={args.madtp_towers}",
                    f"callbacks.madtp.warmup_epochs={args.madtp_warmup}",
                    *(f"callbacks.madtp.{k}={_hydra_value(v)}" for k, v in args.madtp_set.items()),
                ],
            )
        controller = next(c for c in trainer_f.callbacks if type(c).__name__ == "MADTP").controller
        # the last validation ran before the controller's last re-calibration (after the epoch):
        # validate again, so accuracy and FLOPs are of the same model, the one training leaves
        last_epoch = metrics_f
        metrics_f = _validate(module_f, off)  # off: the same overrides, no callbacks
        warm = f", warm-up {args.madtp_warmup} epochs" if args.madtp_warmup else ""
        rows.append(
            _row(
                f"MADTP towers={args.madtp_towers}{_settings(args.madtp_set)}, fine-tuned {args.ft_epochs} "
                f"epochs{warm}",
                metrics_f,
                measured(module_f.model),
                steps=int(trainer_f.global_step),
                last_epoch_i2t_R1=last_epoch.get("val/i2t_R@1"),
                controller_history=controller.history,
                warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
            )
        )
        _log(json.dumps(rows[-1]))
    return rows


def _hydra_value(value: Any) -> str:
    """A setting as a Hydra override value (lists as ``[a,b]``, ``None`` as ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value)


def _settings(settings: dict[str, Any]) -> str:
    return "".join(f" {k}={_hydra_value(v)}" for k, v in settings.items())


def _madtp_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (VALUE read as YAML: ``locations=[2,3,4,5]``, ``align_weight=0.5``)."""
    import yaml

    from vleff.methods.madtp.core import MADTPConfig

    key, sep, value = text.partition("=")
    allowed = {"align_weight", "locations", "min_keep", "num_codes", "code_dim", "ragged"}
    if not sep or key not in allowed:
        raise argparse.ArgumentTypeError(
            f"--madtp-set {text!r} is not allowed; give KEY=VALUE with KEY one of "
            f"{sorted(allowed)} (towers and flops_reduction have their own options)"
        )
    parsed = yaml.safe_load(value)
    try:
        MADTPConfig.build(**{key: parsed})  # the config's own checks name the parameter and the value
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--madtp-set {text!r}: {err}") from None
    return key, parsed


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file for the rows (the runs and the baseline weights go next to it)")
    parser.add_argument("--epochs", type=int, default=10, help="baseline epochs (23 steps each)")
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--ft-lr", type=float, default=5e-4)
    parser.add_argument("--ft-warmup", type=int, default=5)
    parser.add_argument("--layers", type=int, default=6, help="blocks per tower")
    parser.add_argument("--patch-size", type=int, default=4, help="32 px images: patch 4 = 65 image tokens")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--flops-reduction", type=float, default=0.4, help="image FLOPs target: 1 - this")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--r-image", type=int, default=None, help="CrossGET r_image (default: smallest at target)")
    parser.add_argument("--r-text", type=int, default=0)
    parser.add_argument(
        "--madtp-margin",
        type=float,
        default=0.02,
        help="MADTP's controller is asked for flops_reduction + this (see the docstring)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a shared CPU)")
    parser.add_argument("--madtp-towers", choices=("image", "all"), default="image")
    parser.add_argument(
        "--madtp-set",
        dest="madtp_set",
        type=_madtp_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a MADTP setting for both the off-the-shelf and the fine-tuned run "
        "(repeatable), e.g. locations=[2,3,4,5] or align_weight=0.5",
    )
    parser.add_argument(
        "--madtp-samples",
        type=int,
        default=16,
        help="training samples MADTP's controller counts one at a time (from its 2 calibration batches)",
    )
    parser.add_argument(
        "--madtp-warmup",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="fine-tuning: MADTP's reduction ramps linearly to the target over this many epochs",
    )
    parser.add_argument("--flops-samples", type=int, default=64, help="validation images the FLOPs ratio is of")
    parser.add_argument(
        "--budget-samples", type=int, default=16, help="training images fit_budget sets ToMe/Turbo/EViT on"
    )
    parser.add_argument("--baseline-weights", default=None, help="reuse a baseline state dict (skips training it)")
    parser.add_argument(
        "--no-control", dest="control", action="store_false", help="skip the baseline fine-tuned without a method"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. seed=1")
    args = parser.parse_intermixed_args(argv)
    args.madtp_set = dict(args.madtp_set)
    for key in ("epochs", "ft_epochs", "layers", "patch_size", "width", "flops_samples", "threads", "madtp_samples"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)} is not allowed; use a positive int")
    if not 0 <= args.madtp_warmup < args.ft_epochs:
        raise SystemExit(
            f"--madtp-warmup={args.madtp_warmup} is not allowed; use 0 <= warm-up < --ft-epochs "
            f"({args.ft_epochs}), so the last epochs train at the target"
        )
    if not 0 < args.flops_reduction < 1:
        raise SystemExit(f"--flops-reduction={args.flops_reduction} is not allowed; it must be in (0, 1)")
    if not 0 <= args.madtp_margin < 1 - args.flops_reduction:
        raise SystemExit(f"--madtp-margin={args.madtp_margin} is not allowed; use 0 <= margin < 1 - flops_reduction")
    torch.set_num_threads(args.threads)
    rows = run(args)
    from vleff.profile import print_table, rows_to_json

    table = [
        {
            "name": r["run"],
            "flops": f"{r['image_flops_ratio']:.3f}",
            "i2t": _pct(r["i2t_R@1"]),
            "t2i": _pct(r["t2i_R@1"]),
        }
        for r in rows
    ]
    print_table(
        table,
        title="Digits-CLIP with cross-modal token reduction",
        extra_columns={"flops": "image FLOPs x", "i2t": "i2t R@1 %", "t2i": "t2i R@1 %"},
    )
    path = rows_to_json(
        rows,
        args.output,
        benchmark="clip_digits_tokens",
        command=" ".join(["python", *sys.argv]),
        **{k: v for k, v in vars(args).items() if k not in ("output",)},
    )
    _log(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
