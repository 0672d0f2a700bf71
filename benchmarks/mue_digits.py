"""MuE on digits: exit-layer distribution, measured FLOPs and accuracy of a small trained ViT.

    python benchmarks/mue_digits.py [--epochs 8] [--seed 0] [--out mue_digits.json]

A timm ViT (32 px, patch 4: 65 tokens, width 128, 6 blocks, 4 heads) trained from scratch on the
bundled digits (1437 train / 360 val images), AdamW 1e-3 with cosine decay, batch 64, CPU, twice
from the same initial weights: with the user's loss only (``plain``) and with MuE's layer-wise loss
added (``layerwise``: vleff's ``LayerwiseLoss``, the callback's ``layerwise_loss=True``). Then, in
eval mode on the validation split, for each image threshold: top-1, how many blocks each sample ran
(histogram), and the FLOPs of the whole forward counted by ``vleff.flops.count_flops`` relative to
threshold 1.0 (no exit). Nothing is selected on the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

THRESHOLDS = (1.0, 0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)


def make_model(seed: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10)


def train(model, images, labels, epochs: int, seed: int, layerwise: bool) -> float:
    import vleff
    from vleff.methods.mue.lightning import LayerwiseLoss
    from vleff.tokens.aux import vleff_aux_loss

    vleff.apply_mue(model)  # threshold 1.0 (no exit); the layer-wise loss reads the patched tower's state
    extra = LayerwiseLoss(model) if layerwise else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), 64):
            idx = order[i : i + 64]
            x, y = images[idx], labels[idx]
            if extra is not None:
                extra.set_labels(y)
            loss = F.cross_entropy(model(x), y) + vleff_aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    if extra is not None:
        extra.remove()
    model.eval()
    return time.perf_counter() - start


def evaluate(model, images, labels) -> list[dict]:
    import vleff
    from vleff.flops import count_flops
    from vleff.methods.mue import mue_exit_blocks

    rows, base = [], None
    for t in THRESHOLDS:
        vleff.update(model, "mue", image_threshold=t)
        with torch.no_grad():
            acc = (model(images).argmax(-1) == labels).float().mean().item()
            blocks = mue_exit_blocks(model)["image"]
        flops = count_flops(model, images)
        base = flops if base is None else base
        hist = torch.bincount(blocks, minlength=7)[1:].tolist()
        rows.append(
            {
                "threshold": t,
                "top1": round(acc, 4),
                "mean_blocks": round(blocks.float().mean().item(), 3),
                "blocks_hist_1_to_6": hist,
                "flops_ratio": round(flops / base, 4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mue_digits.json")
    args = parser.parse_args()
    from vleff.data.digits import digits_arrays

    xtr, ytr = digits_arrays(32, "train")
    xva, yva = digits_arrays(32, "val")
    out = {"epochs": args.epochs, "seed": args.seed, "threads": torch.get_num_threads(), "runs": {}}
    for variant in ("plain", "layerwise"):
        model = make_model(args.seed)
        seconds = train(model, xtr, ytr, args.epochs, args.seed, variant == "layerwise")
        out["runs"][variant] = {"train_seconds": round(seconds, 1), "eval": evaluate(model, xva, yva)}
        print(variant, f"{seconds:.0f}s")
        for row in out["runs"][variant]["eval"]:
            print("  ", row)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
