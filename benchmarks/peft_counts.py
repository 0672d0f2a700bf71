"""Trainable parameters of vleff's peft tuners and prompt methods on ViT-B/16 (timm ``vit_base_patch16_224``, random
init, classifier head frozen), measured and checked against the analytic count.

    python benchmarks/peft_counts.py

Analytic counts (12 blocks, width 768, qkv 2304 x 768, MLP hidden 3072):
LoRA r: r(768 + 2304) per block; DoRA r: LoRA + 2304 magnitudes; AdaLoRA init_r: init_r(768 + 2304 + 1);
IA3: 2304 (qkv outputs) + 3072 (fc2 inputs); LoHa r: 2r(768 + 2304); LoKr r=8: W1 48 x 24 in full +
the 48 x 32 factor at rank 8 (2304 = 48 * 48, 768 = 24 * 32); OFT block b: (768 / b) blocks of b(b - 1)/2.
Prompt methods (vleff's own, ``vleff.side.prompts``): VPT-deep N: 12 * N * 768; prefix length l:
2 * 12 * l * 768, with Li & Liang's MLP (h = 512): l * 768 + (768 * 512 + 512) + (512 + 1) * 2 * 12 * 768;
APrompt P_kv key/value and N input prompts: 12 * 768 * (2 * P_kv + N).
Bottleneck adapters (vleff's own, ``vleff.side.bottleneck``; one bottleneck of width m: 2 * 768 * m + m + 768):
serial (Houlsby) two per block, + every LayerNorm (25 of them, 2 * 768 each) with ``train_norms``;
parallel (AdaptFormer m = 64, He et al.'s FFN adapter m = 512) one per block.
Selective methods (vleff's own, ``vleff.side.selection``): BitFit: every bias, per block qkv 2304 + proj 768 +
fc1 3072 + fc2 768 + two LayerNorms 2 * 768, plus the patch embedding's 768 and the final norm's 768.
"""

from __future__ import annotations

import timm
import torch

import vleff
from vleff.registry import get_method

BLOCKS, C, QKV, HIDDEN = 12, 768, 3 * 768, 3072
ROWS = [
    ("lora", {"r": 8}, BLOCKS * 8 * (C + QKV)),
    ("dora", {"r": 8}, BLOCKS * (8 * (C + QKV) + QKV)),
    ("adalora", {"init_r": 12, "target_r": 8, "total_step": 1000}, BLOCKS * 12 * (C + QKV + 1)),
    ("ia3", {}, BLOCKS * (QKV + HIDDEN)),
    ("loha", {"r": 8}, BLOCKS * 2 * 8 * (C + QKV)),
    ("lokr", {"r": 8}, BLOCKS * (48 * 24 + 8 * (48 + 32))),
    ("oft", {"block_size": 32}, BLOCKS * (C // 32) * 32 * 31 // 2),
    ("vpt", {"num_tokens": 10}, BLOCKS * 10 * C),
    ("vpt", {"num_tokens": 50}, BLOCKS * 50 * C),
    ("prefix", {"num_tokens": 10}, 2 * BLOCKS * 10 * C),
    ("prefix", {"num_tokens": 10, "projection": 512}, 10 * C + (C * 512 + 512) + (512 + 1) * 2 * BLOCKS * C),
    ("aprompt", {"kv_tokens": 10, "num_tokens": 0}, 2 * BLOCKS * 10 * C),
    ("aprompt", {"kv_tokens": 10, "num_tokens": 10}, 3 * BLOCKS * 10 * C),
    ("serial_adapter", {"bottleneck": 64, "train_norms": False}, 2 * BLOCKS * (2 * C * 64 + 64 + C)),
    ("serial_adapter", {"bottleneck": 64}, 2 * BLOCKS * (2 * C * 64 + 64 + C) + (2 * BLOCKS + 1) * 2 * C),
    ("serial_adapter", {"bottleneck": 8, "train_norms": False}, 2 * BLOCKS * (2 * C * 8 + 8 + C)),
    ("parallel_adapter", {"bottleneck": 64}, BLOCKS * (2 * C * 64 + 64 + C)),
    (
        "parallel_adapter",
        {"bottleneck": 512, "scale": 4.0, "dropout": 0.0, "reads": "mlp_input"},
        BLOCKS * (2 * C * 512 + 512 + C),
    ),
    ("bitfit", {"train_head": False}, BLOCKS * (QKV + C + HIDDEN + C + 2 * C) + C + C),
]
#: vleff's own prompt and adapter methods: applied through the registry, then the head frozen too
PROMPTS = {"vpt", "prefix", "aprompt", "serial_adapter", "parallel_adapter"}
#: vleff's own selective methods: applied through the registry with the head frozen by their setting
SELECTIVE = {"bitfit"}


def main() -> None:
    print("| method | settings | trainable (measured) | analytic |")
    print("|---|---|---|---|")
    for method, settings, analytic in ROWS:
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        if method in SELECTIVE:
            get_method(method).apply(model, **settings)
        elif method in PROMPTS:
            get_method(method).apply(model, **settings)
            vleff.side.freeze_backbone(model, train_head=False)
        else:
            vleff.apply_peft(model, method=method, train_head=False, **settings)
        measured = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert measured == analytic, (method, measured, analytic)
        print(f"| {method} | {settings} | {measured:,} | {analytic:,} |")


if __name__ == "__main__":
    main()
