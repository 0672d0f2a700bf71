"""Bytes saved for backward: full fine-tuning vs VQT (frozen backbone) on timm ViT-B/16 at 224 px.

Random init (no download), batch 8, fp32, CPU; counted with
:func:`vleff.profile.saved_activation_bytes` (exact on any machine). Also the trainable share.

    python benchmarks/vqt_memory.py [--batch 8] [--queries 1]
"""

from __future__ import annotations

import argparse

import timm
import torch

from vleff.methods.vqt.core import apply_vqt, freeze_backbone_for_vqt
from vleff.profile.memory import saved_activation_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--queries", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 224, 224)
    model = timm.create_model(args.model, num_classes=10).eval()
    full = saved_activation_bytes(lambda: model(x).logsumexp(-1).mean())
    apply_vqt(model, num_queries=args.queries)
    freeze_backbone_for_vqt(model)
    vqt = saved_activation_bytes(lambda: model(x).logsumexp(-1).mean())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{args.model}, batch {args.batch}, T={args.queries}: full fine-tuning {full / 2**20:.1f} MiB, "
        f"VQT {vqt / 2**20:.1f} MiB ({vqt / full:.3f}x); trainable {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f} %)"
    )


if __name__ == "__main__":
    main()
