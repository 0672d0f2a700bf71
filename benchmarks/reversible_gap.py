"""MEFT's starting gap and the fp32 gradient error of the reconstruction, for λ, β in {0.1, 0.3, 1}.

For each tower (timm ViT-B/16 image, open_clip ViT-B-32 image and text; random initialisation
at the real sizes, ``pretrained=False``: no download) and each (λ, β):

* **gap**: ``‖f_rev(x) − f(x)‖ / ‖f(x)‖`` of the tower's output embedding (timm: pre-logits
  features; open_clip: ``encode_image`` / ``encode_text``) made reversible with MEFT's
  couplings and freshly drawn adapters (bottleneck 8), against the plain tower, eval mode;
* **grad err**: relative error of the whole gradient (all block parameters, adapters
  included) of the reversible backward against ordinary autograd through the same couplings
  (:func:`vleff.methods.reversible.core.plain_autograd`), in a float32 model with float32 streams
  and with float64 streams (MEFT's default) — the rounding error the reconstruction
  amplifies block after block (:func:`vleff.methods.reversible.core.block_amplification`).

Batch 1 image (224 px) / 2 random 77-token texts, fp32, CPU.

    python benchmarks/reversible_gap.py [--out reversible_gap.json] [--towers timm,image,text]
        [--streams float64,float32] [--settings 1:1,1:1:balance,revvit]
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable

import torch

from vleff.methods.reversible.core import (
    ReversibleConfig,
    apply_reversible,
    block_amplification,
    plain_autograd,
    remove_reversible,
)

SCALES = (0.1, 0.3, 1.0)


def towers(names: list[str]) -> dict[str, tuple[torch.nn.Module, Callable, torch.nn.Module]]:
    """name -> (model, output function, module whose parameters are compared)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 224, 224, generator=g)
    if "timm" in names:
        import timm

        torch.manual_seed(0)
        vit = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        out["timm ViT-B/16 image"] = (
            vit,
            lambda m: m.forward_head(m.forward_features(image), pre_logits=True),
            vit.blocks,
        )
    if {"image", "text"} & set(names):
        import open_clip

        torch.manual_seed(0)
        clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        text = torch.randint(1, 49407, (2, 77), generator=g)
        text[:, 0], text[:, 20:] = 49406, 0
        text[:, 19] = 49407  # start, 18 tokens, end, padding: EOT pooling at position 19
        if "image" in names:
            out["open_clip ViT-B-32 image"] = (clip, lambda m: m.encode_image(image), clip.visual.transformer)
        if "text" in names:
            out["open_clip ViT-B-32 text"] = (clip, lambda m: m.encode_text(text), clip.transformer)
    return out


def _grads(run: Callable[[], torch.Tensor], params: list[torch.Tensor], direction: torch.Tensor) -> torch.Tensor:
    out = run()
    got = torch.autograd.grad((out * direction).sum(), params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, got)])


def measure(
    model: torch.nn.Module,
    fn: Callable,
    blocks: torch.nn.Module,
    settings: dict,
    streams_list: tuple[str, ...] = ("float64", "float32"),
) -> dict:
    with torch.no_grad():
        ref = fn(model)
    tower = "text" if blocks is getattr(model, "transformer", None) else "image"
    torch.manual_seed(1)  # the same adapters for every (λ, β)
    row: dict = {}
    for streams in streams_list:
        torch.manual_seed(1)  # the same adapters for every (λ, β) and both stream dtypes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the amplification warning: measured here instead
            apply_reversible(model, towers=tower, streams=streams, **settings)
        try:
            with torch.no_grad():
                out = fn(model)
            direction = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            params = [p for p in blocks.parameters() if p.requires_grad]
            got = _grads(lambda: fn(model), params, direction)
            if streams == streams_list[0]:  # the reference, with every activation kept
                row["gap"] = float((out - ref).norm() / ref.norm())
                with plain_autograd():
                    want = _grads(lambda: fn(model), params, direction)
            row[f"grad_err_{streams}"] = float((got - want).norm() / want.norm())
        finally:
            remove_reversible(model)
    row["predicted_per_block"] = block_amplification(ReversibleConfig(**settings))
    return row


def _setting(spec: str) -> dict:
    """``"revvit"``, ``"lam:beta"`` or ``"lam:beta:balance"`` as ``apply_reversible`` settings."""
    if spec == "revvit":
        return dict(coupling="revvit")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "balance"):
        raise SystemExit(f"--settings: {spec!r} is not 'revvit', 'lam:beta' or 'lam:beta:balance'")
    out = dict(coupling="meft", lam=float(parts[0]), beta=float(parts[1]))
    return {**out, "balance": True} if len(parts) == 3 else out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    parser.add_argument("--towers", default="timm,image,text", help="comma-separated: timm, image, text")
    parser.add_argument(
        "--streams",
        default="float64,float32",
        help="stream dtypes to measure the gradient error with (the first also gives the gap)",
    )
    parser.add_argument(
        "--settings",
        default=None,
        help="comma-separated MEFT settings 'lam:beta' or 'lam:beta:balance' and/or 'revvit' "
        "(default: the 3x3 grid of λ, β in {0.1, 0.3, 1} and revvit)",
    )
    args = parser.parse_args()
    grid = [dict(coupling="meft", lam=lam, beta=beta) for lam in SCALES for beta in SCALES] + [dict(coupling="revvit")]
    if args.settings:
        grid = [_setting(spec) for spec in args.settings.split(",")]
    rows = []
    print(
        f"{'tower':<26}{'coupling':>9}{'lam':>6}{'beta':>6}{'gap':>8}{'grad err f32 streams':>22}"
        f"{'grad err f64 streams':>22}"
    )
    for name, (model, fn, blocks) in towers(args.towers.split(",")).items():
        for settings in grid:
            row = {"tower": name, **settings, **measure(model, fn, blocks, settings, tuple(args.streams.split(",")))}
            rows.append(row)
            print(
                f"{name:<26}{row['coupling'] + ('+bal' if row.get('balance') else ''):>9}"
                f"{row.get('lam', '-'):>6}{row.get('beta', '-'):>6}{row['gap']:>8.3g}"
                f"{row.get('grad_err_float32', float('nan')):>22.2g}"
                f"{row.get('grad_err_float64', float('nan')):>22.2g}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
