"""``vleff.fit_budget`` on full-size models: each token method fitted to a FLOPs target, the ratio
it lands on, the evaluations and the time it took (issue 26: within 2 % on ViT-B/16 and on open_clip
ViT-B-32, both towers).

ViT-B/16 (timm, 224 px, 197 tokens) and open_clip ViT-B-32 (both towers: 50 image tokens, 77 text
tokens), random init, batch 2, fp32, CPU. ToMe on ViT-B/16 is also checked against an independent
count: the model's FLOPs from its shapes and the token counts of the fitted forward.

    python benchmarks/fit_budget.py [--targets 0.5 0.6] [--out docs/data/fit_budget.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import torch

import vleff
from vleff.backbones import last_token_state, token_counts
from vleff.registry import get_method

VIT_METHODS = {
    "tome": {"r": 0},
    "turbo": {"r": 0},
    "evit": {"keep_rate": 1.0},
    "dynamicvit": {"distill": False},
}
CLIP_METHODS = {"tome": {"r": 0, "towers": "all"}, "crossget": {"r_image": 0, "r_text": 0}, "madtp": {}}


def vit() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False).eval()


def clip() -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None).eval()


def vit_analytic(model: torch.nn.Module, batch: int) -> int:
    """ViT-B/16's FLOPs from its shapes and the token counts of its last forward (attention on the
    tokens entering a block, the MLP on those left after a merge, ToMe's matching where it merged)."""
    d, heads, patches, depth = 768, 12, 196, 12
    counts = token_counts(model).get("image", [patches + 1] * depth)
    state = last_token_state(model)
    after = [*counts[1:], state.num_tokens if state is not None else patches + 1]
    f = 2 * patches * (3 * 16 * 16) * d + 2 * d * 1000
    for n, kept in zip(counts, after):
        f += 8 * n * d * d + 4 * n * n * d + 16 * kept * d * d
        if kept < n:
            f += 2 * math.ceil(n / 2) * (n // 2) * (d // heads)
    return batch * f


def run(model_name: str, build, methods: dict, batch, targets: list[float], analytic=None) -> list[dict]:
    rows = []
    for name, settings in methods.items():
        for target in targets:
            model = build()
            plain = analytic(model, 2) if analytic is not None and name == "tome" else None
            get_method(name).apply(model, **settings)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                fit = vleff.fit_budget(model, [batch], flops=target, strict=False)
            row = {
                "model": model_name,
                "method": name,
                "target": target,
                "ratio": fit.ratio,
                "error": fit.error,
                "evaluations": len(fit.evaluations),
                "seconds": time.perf_counter() - start,
                "settings": {k: v for k, v in fit.settings.items()},
                "warning": str(caught[0].message) if caught else None,
            }
            if plain is not None:
                with torch.no_grad():
                    model(batch)
                row["independent_ratio"] = analytic(model, 2) / plain
            rows.append(row)
            print(
                f"| {model_name} | {name} | {target} | {fit.ratio:.4f} | {100 * fit.error:.2f} % | "
                f"{len(fit.evaluations)} | {row['seconds']:.1f} s | "
                f"{row.get('independent_ratio', float('nan')):.4f} |",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    import open_clip

    ids = open_clip.tokenize(["a photo of a small dog on the grass", "two cats sleeping on a red sofa"])
    print("| model | method | target | ratio | error | evaluations | time | independent ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = run("ViT-B/16", vit, VIT_METHODS, images, args.targets, vit_analytic)
    rows += run("open_clip ViT-B-32 (both towers)", clip, CLIP_METHODS, (images, ids), args.targets)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batch_size": 2, "device": "cpu", "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
