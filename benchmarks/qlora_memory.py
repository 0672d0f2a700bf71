"""QLoRA's 4-bit base on ViT-B/16 (timm ``vit_base_patch16_224``, random init): the bytes its NF4
weights take against fp32 / bf16, the bits per parameter with the double-quantised scales, the
fp32 copy kept for an exact removal, the quantisation error, and LoRA's trainable parameters.

    python benchmarks/qlora_memory.py [--r 8] [--out docs/data/qlora_memory.json]

Analytic: NF4 codes take 4 bits per weight; each block of 64 weights has an absmax scale, itself
quantised to 8 bits in blocks of 256 with one fp32 scale per block (the paper's double
quantisation): 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per parameter (plus a few bytes of tables).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

import vleff
from vleff.methods.qlora.core import qlora_quantization_error, qlora_weight_bytes

MB = 1e6


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    vleff.apply_qlora(model, r=args.r)
    row = dict(qlora_weight_bytes(model))
    row["analytic_bits_per_param"] = 4 + 8 / 64 + 32 / (64 * 256)
    row["relative_error"] = qlora_quantization_error(model)
    row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("| quantised weights | NF4 MB | fp32 MB | bf16 MB | bits / param (analytic) | kept fp32 MB | ‖W − deq‖/‖W‖ |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {row['params']:,} | {row['nf4_bytes'] / MB:.1f} | {row['fp32_bytes'] / MB:.1f} | "
        f"{row['bf16_bytes'] / MB:.1f} | {row['bits_per_param']:.3f} ({row['analytic_bits_per_param']:.3f}) | "
        f"{row['kept_bytes'] / MB:.1f} | {row['relative_error']:.4f} |"
    )
    print(f"trainable (LoRA r={args.r} and the head): {row['trainable']:,}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(row, indent=2))
    return row


if __name__ == "__main__":
    main()
