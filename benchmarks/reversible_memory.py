"""Bytes saved for backward by a timm ViT: plain backprop, gradient checkpointing, reversible.

Width 64, 4 heads, 32 px images with 8 px patches (17 tokens), batch 32, fp32, CPU; depth 6,
12 and 24. Bytes are counted with :func:`vleff.profile.saved_activation_bytes` (every tensor
autograd saves, parameters excluded: exact on any machine). Also one training step's time at
depth 12, one thread, best of 3, as ratios against plain backprop and against gradient
checkpointing (``revvit``: RevNet couplings; ``meft``: the defaults, with adapters and
float64 streams).

    python benchmarks/reversible_memory.py [--out reversible_memory.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timm.models.vision_transformer import VisionTransformer

from vleff.methods.reversible.core import apply_reversible
from vleff.profile import saved_activation_bytes

MODES = ("plain", "checkpointing", "revvit", "meft")


def make(depth: int, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=depth, num_heads=4, num_classes=10).train()
    if mode in ("revvit", "meft"):
        apply_reversible(model, coupling=mode)
    if mode == "checkpointing":
        model.set_grad_checkpointing(True)
    return model


def step_seconds(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        model(x).square().mean().backward()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rows = []
    for depth in (6, 12, 24):
        row = {"depth": depth}
        for mode in MODES:
            model = make(depth, mode)
            row[mode] = saved_activation_bytes(lambda: model(x))
        rows.append(row)
    steps = {mode: step_seconds(make(12, mode), x) for mode in MODES}
    ratios = {
        mode: {"vs_plain": s / steps["plain"], "vs_checkpointing": s / steps["checkpointing"]}
        for mode, s in steps.items()
    }
    print(f"{'depth':>5}" + "".join(f"{m + ' MB':>18}" for m in MODES))
    for row in rows:
        print(f"{row['depth']:>5}" + "".join(f"{row[m] / 1e6:>18.2f}" for m in MODES))
    print(
        "ratios: depth 24 / depth 6: "
        + ", ".join(f"{m} {rows[-1][m] / rows[0][m]:.2f}x" for m in MODES)
        + "; against plain at depth 12: "
        + ", ".join(f"{m} {rows[1][m] / rows[1]['plain']:.3f}x" for m in MODES)
    )
    print(f"{'step time, depth 12, 1 thread':<32}{'seconds':>9}{'vs plain':>10}{'vs checkpointing':>18}")
    for mode, s in steps.items():
        print(f"{mode:<32}{s:>9.3f}{ratios[mode]['vs_plain']:>9.2f}x{ratios[mode]['vs_checkpointing']:>17.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"saved_bytes": rows, "step_seconds_depth12": steps, "step_time_ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
