"""Transkimmer's batched inference: what a batch costs per image once ``keep_threshold`` is fitted
for one image (issue 28).

Transkimmer decides per token and per sample, so the samples of a batch keep different tokens.
vleff packs each sample's kept tokens and runs the batch at the width of the sample that keeps the
most (fillers masked); before that, a batch ran the union of its samples' kept tokens. This
script measures what a batch costs per image against the same model on one image:

1. a random-init timm ViT (no downloads) gets Transkimmer with its defaults (untrained predictors);
2. :func:`vleff.fit_budget` sets ``keep_threshold`` so that ``--flops`` × the plain model's FLOPs
   is what an image costs, fitted on ``--fit-images`` images one at a time;
3. for each ``--batches`` size: the FLOPs per image of that batch (``count_flops`` / batch size,
   over the plain model's), the tokens each block runs, and the throughput ratio against the plain
   model on the same batches (interleaved rounds, ``--threads`` pinned, warm-up first, median of
   ``--rounds``). ``of limit`` = speed-up × FLOPs ratio of the batch.

Run it from two checkouts (``--label``) to compare implementations; each run times its own plain
model, so its ratios stand on their own.

    python benchmarks/transkimmer_batched.py --threads 2 --out docs/data/transkimmer_batched/packed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import vleff
from vleff.profile import count_flops


def _images(count: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _seconds(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(b)
    return time.perf_counter() - start


def interleaved(plain: torch.nn.Module, method: torch.nn.Module, batches: list[torch.Tensor], rounds: int):
    """Median seconds of each over ``rounds`` rounds whose order alternates, after a warm-up each."""
    _seconds(plain, batches[:1])
    _seconds(method, batches[:1])
    times: dict[str, list[float]] = {"plain": [], "method": []}
    for r in range(rounds):
        order = [("plain", plain), ("method", method)]
        for key, model in order if r % 2 == 0 else order[::-1]:
            times[key].append(_seconds(model, batches))
    return statistics.median(times["plain"]), statistics.median(times["method"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="a timm model name (random init)")
    parser.add_argument("--flops", type=float, default=0.6, help="the per-image FLOPs budget fitted")
    parser.add_argument("--fit-images", type=int, default=8, help="images the threshold is fitted on, one at a time")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes measured")
    parser.add_argument("--timed-images", type=int, default=32, help="images per timed round at each batch size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--label", default="packed", help="names this checkout's implementation in the rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import timm

    torch.manual_seed(0)
    plain = timm.create_model(args.model, pretrained=False).eval()
    size = plain.default_cfg["input_size"][-1]
    model = copy.deepcopy(plain)
    vleff.apply_transkimmer(model)
    fit_images = _images(args.fit_images, size, seed=1)
    singles = [fit_images[i : i + 1] for i in range(args.fit_images)]
    fit = vleff.fit_budget(model, singles, flops=args.flops, strict=False)
    threshold = fit.settings["keep_threshold"]
    print(f"{args.model}: keep_threshold {threshold:.6g}, {fit.ratio:.3f}x per image ({args.label})")
    print("| batch | FLOPs per image (ratio) | tokens per block (max over batches) | speed-up | of limit |")
    print("|---:|---:|---|---:|---:|")
    rows = []
    test_images = _images(args.timed_images, size, seed=2)
    one = count_flops(plain, test_images[:1])
    for batch in args.batches:
        batches = list(test_images.split(batch))
        batches = [b for b in batches if b.shape[0] == batch] or batches[:1]
        ratios, widths = [], []
        for b in batches:
            ratios.append(count_flops(model, b) / (one * b.shape[0]))
            widths.append(vleff.token_counts(model)["image"])
        ratio = statistics.mean(ratios)
        width = [max(w[i] for w in widths) for i in range(len(widths[0]))]
        plain_s, method_s = interleaved(plain, model, batches, args.rounds)
        speedup = plain_s / method_s
        row = {
            "label": args.label,
            "model": args.model,
            "batch": batch,
            "flops_ratio": ratio,
            "speedup": speedup,
            "of_limit": speedup * ratio,
            "tokens": width,
            "plain_s": plain_s,
            "method_s": method_s,
            "keep_threshold": fit.settings["keep_threshold"],
            "fit_ratio": fit.ratio,
        }
        rows.append(row)
        print(f"| {batch} | {ratio:.3f} | {width} | {speedup:.2f}x | {row['of_limit']:.0%} |", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": vars(args), "device": "cpu", "torch": torch.__version__}
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
