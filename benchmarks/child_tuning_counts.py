"""Child-Tuning on ViT-B/16 (timm ``vit_base_patch16_224``, random init, 1000-class head): what trains
and how many gradient entries pass a step, measured and checked against the analytic count.

    python benchmarks/child_tuning_counts.py

Child-Tuning is not parameter-efficient: every parameter trains (86,567,656 = the whole model). What
it changes is how many gradient entries reach the optimizer per step:
* Child-Tuning_D masks the blocks' parameters only: 12 * (qkv 768 * 2304 + 2304, proj 768 * 768 + 768,
  fc1 768 * 3072 + 3072, fc2 3072 * 768 + 768, two LayerNorms 4 * 768) = 85,054,464 entries; one joint
  percentile threshold keeps n - ceil((1 - p)(n - 1)) of them (distinct scores), 25,516,339 at p = 0.3,
  plus the 1,513,192 entries outside the blocks (embeddings, final norm, head) in full.
* Child-Tuning_F draws every entry of the tower with probability p: 0.3 * 86,567,656 on average.
The Fisher pass here reads one batch of two random images with random labels (the count, not the mask,
is the point).
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F

import vleff
from vleff.side import selection as sel

BLOCKS, C, QKV, HIDDEN = 12, 768, 3 * 768, 3072
PER_BLOCK = (C * QKV + QKV) + (C * C + C) + (C * HIDDEN + HIDDEN) + (HIDDEN * C + C) + 4 * C


def main() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    total = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(2, 3, 224, 224), torch.randint(0, 1000, (2,))

    vleff.apply_child_tuning_d(
        model, reserve_p=0.3, batches=[(x, y)], loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1])
    )
    masks = sel.masks_of(model, "child_tuning_d")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    masked = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    analytic_kept = BLOCKS * PER_BLOCK - math.ceil(0.7 * (BLOCKS * PER_BLOCK - 1))
    rows = [
        ("whole model, trainable under either variant", trainable, total),
        ("Child-Tuning_D: masked entries (the blocks)", masked, BLOCKS * PER_BLOCK),
        ("Child-Tuning_D p=0.3: block entries whose gradients pass", kept, analytic_kept),
        ("Child-Tuning_D: entries outside the blocks (update in full)", total - masked, total - BLOCKS * PER_BLOCK),
    ]
    vleff.remove_child_tuning_d(model)
    vleff.apply_child_tuning_f(model, reserve_p=0.3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    drawn = sum(int(m.sum()) for m in sel.mask_gradients(model).values())
    print(f"{'what':62} {'measured':>12} {'analytic':>12}")
    for what, measured, analytic in rows:
        assert measured == analytic, (what, measured, analytic)
        print(f"{what:62} {measured:>12,} {analytic:>12,}")
    sd = math.sqrt(total * 0.3 * 0.7)
    assert abs(drawn - 0.3 * total) < 5 * sd
    print(
        f"{'Child-Tuning_F p=0.3: entries passing one step (one draw)':62} {drawn:>12,} "
        f"{0.3 * total:>12,.1f} ± {sd:,.0f}"
    )


if __name__ == "__main__":
    main()
