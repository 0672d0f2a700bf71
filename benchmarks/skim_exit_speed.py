"""Transkimmer and MuE at a fitted FLOPs budget: the FLOPs ratio :func:`vleff.fit_budget` lands on and
the CPU throughput ratio it buys, as a fraction of the FLOP limit (issue 26).

For each model (random init, no downloads) and method: the method is applied with its defaults
(Transkimmer's untrained predictors, MuE's threshold 1.0), ``fit_budget`` sets its knob
(Transkimmer ``keep_threshold``, MuE's exit threshold of every tower it is on) so the FLOPs counted
on the benchmark's batches are ``--flops`` × the model without it, and the plain and the fitted
model are timed on those same batches in one process: interleaved rounds (plain, method, then
method, plain, ...), ``--threads`` pinned, a warm-up forward each, the median of ``--rounds``
rounds of ``--reps`` forwards. ``of limit`` = speedup / (1 / FLOPs ratio): 1.0 would turn every
FLOP saved into time.

Models: timm ViT-S/16 and ViT-B/16 at 224 px (image tower), open_clip ViT-B-32 (both towers:
``encode_image`` + ``encode_text``), Hugging Face BLIP (``BlipForImageTextRetrieval``, base
config) at 384 px (vision tower + text encoder, both towers). Methods on every tower of the model.

    python benchmarks/skim_exit_speed.py --threads 1 [--flops 0.6] [--batch 2] [--models vit_s vit_b clip blip]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import vleff
from vleff.budget import default_forward
from vleff.registry import get_method

METHODS = {"transkimmer": {}, "mue": {}}


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False).eval()

    return build


def _clip() -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def _blip() -> torch.nn.Module:
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(0)
    return BlipForImageTextRetrieval(BlipConfig()).eval()  # base: ViT-B/16 at 384 px, BERT-base text


def _batches(model: str, batch: int, count: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    size = 384 if model == "blip" else 224
    out = []
    for _ in range(count):
        images = torch.randn(batch, 3, size, size, generator=g)
        if model == "clip":
            ids = torch.zeros(batch, 77, dtype=torch.long)
            for i in range(batch):  # sot, words, eot (the largest id), padding: open_clip's layout
                n = 6 + 5 * i
                ids[i, 0], ids[i, 1 : n + 1] = 49406, torch.randint(300, 40000, (n,), generator=g)
                ids[i, n + 1] = 49407
            out.append((images, ids))
        elif model == "blip":
            ids = torch.randint(1000, 30000, (batch, 35), generator=g)
            ids[:, 0] = 101  # [CLS]: the pooled position
            mask = torch.ones_like(ids)
            for i in range(batch):
                mask[i, 20 + 5 * i :] = 0
            out.append((images, ids, mask))
        else:
            out.append(images)
    return out


MODELS: dict[str, tuple[str, Callable[[], torch.nn.Module], str]] = {
    "vit_s": ("ViT-S/16 224 px", _timm("vit_small_patch16_224"), "image"),
    "vit_b": ("ViT-B/16 224 px", _timm("vit_base_patch16_224"), "image"),
    "clip": ("open_clip ViT-B-32 (both towers)", _clip, "all"),
    "blip": ("BLIP 384 px (vision + text encoder)", _blip, "all"),
}


def _seconds(model: torch.nn.Module, batches: list[Any], reps: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            for b in batches:
                default_forward(model, b)
    return time.perf_counter() - start


def interleaved(plain: torch.nn.Module, fitted: torch.nn.Module, batches: list[Any], rounds: int, reps: int):
    """Median seconds of ``plain`` and ``fitted`` over ``rounds`` interleaved rounds (the order
    alternates, so drift of a shared CPU falls on both), after one warm-up forward each."""
    _seconds(plain, batches, 1)
    _seconds(fitted, batches, 1)
    times: dict[str, list[float]] = {"plain": [], "fitted": []}
    for r in range(rounds):
        order = [("plain", plain), ("fitted", fitted)]
        for key, model in order if r % 2 == 0 else order[::-1]:
            times[key].append(_seconds(model, batches, reps))
    return statistics.median(times["plain"]), statistics.median(times["fitted"])


def run(key: str, args: argparse.Namespace) -> list[dict]:
    label, build, towers = MODELS[key]
    batches = _batches(key, args.batch, args.fit_batches)
    plain = build()
    rows = []
    for name, settings in METHODS.items():
        fitted = copy.deepcopy(plain)
        get_method(name).apply(fitted, **settings, towers=towers)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            fit = vleff.fit_budget(fitted, batches, flops=args.flops, strict=False)
        fit_s = time.perf_counter() - start
        base_s, method_s = interleaved(plain, fitted, batches, args.rounds, args.reps)
        speedup = base_s / method_s
        row = {
            "model": label,
            "method": name,
            "target": args.flops,
            "flops_ratio": fit.ratio,
            "fit_error": fit.error,
            "settings": fit.settings,
            "speedup": speedup,
            "throughput_ratio": speedup,
            "of_limit": speedup * fit.ratio,
            "plain_s": base_s,
            "method_s": method_s,
            "fit_s": fit_s,
            "warning": str(caught[0].message) if caught else None,
        }
        rows.append(row)
        print(
            f"| {label} | {name} | {fit.ratio:.3f} | {speedup:.2f}x | {row['of_limit']:.2f} | "
            f"{', '.join(f'{k}={v:.6g}' for k, v in fit.settings.items())} |",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--flops", type=float, default=0.6)
    parser.add_argument("--batch", type=int, default=2, help="samples per batch")
    parser.add_argument("--fit-batches", type=int, default=2, help="batches fitted on and timed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} batch={args.batch} x {args.fit_batches} rounds={args.rounds} reps={args.reps}")
    print("| model | method | FLOPs ratio | throughput ratio | of limit | fitted knob |")
    print("|---|---|---|---|---|---|")
    rows = [row for key in args.models for row in run(key, args)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": "cpu", "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
