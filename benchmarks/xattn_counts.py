"""Trainable parameters of Xattn (cross-attention only) on BLIP-base's text models, measured on models built
from ``transformers.BlipConfig()``'s defaults (BLIP-base: 12 text layers, width 768, image width 768) on the
meta device (no weights, no download), and checked against the analytic count.

    python benchmarks/xattn_counts.py

Analytic count per text model: 12 layers x (query and output 768 x 768 + 768, key and value from the image
width 768 x 768 + 768 each, + the cross-attention LayerNorm 2 x 768 with ``train_norms``).
"""

from __future__ import annotations

import torch
from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering
from transformers.models.blip.modeling_blip_text import BlipTextModel

from vleff.methods.xattn import apply_xattn


def analytic(cfg, norms: bool) -> int:
    c, e = cfg.hidden_size, cfg.encoder_hidden_size
    return cfg.num_hidden_layers * (2 * (c * c + c) + 2 * (c * e + c) + (2 * c if norms else 0))


def main() -> None:
    cfg = BlipConfig()
    text = cfg.text_config
    rows = [
        ("BlipTextModel (no pooler)", lambda: BlipTextModel(text, add_pooling_layer=False), {}, 1),
        ("BlipForImageTextRetrieval (ITM)", lambda: BlipForImageTextRetrieval(cfg), {}, 1),
        ("BlipForConditionalGeneration (captioning)", lambda: BlipForConditionalGeneration(cfg), {}, 1),
        ("BlipForQuestionAnswering (VQA)", lambda: BlipForQuestionAnswering(cfg), {}, 2),
        ("BlipForQuestionAnswering (VQA)", lambda: BlipForQuestionAnswering(cfg), {"text_models": "decoder"}, 1),
    ]
    print("| model | settings | trainable (measured) | analytic | of the model |")
    print("|---|---|---|---|---|")
    for label, make, settings, models in rows:
        for norms in (True, False):
            with torch.device("meta"):
                model = make()
            total = sum(p.numel() for p in model.parameters())
            chosen = {**settings, "train_norms": norms, "train_head": False}
            apply_xattn(model, **chosen)
            measured = sum(p.numel() for p in model.parameters() if p.requires_grad)
            expected = models * analytic(text, norms)
            assert measured == expected, (label, chosen, measured, expected)
            print(f"| {label} | {chosen} | {measured:,} | {expected:,} | {100 * measured / total:.1f} % |")


if __name__ == "__main__":
    main()
