"""MADTP's FLOPs controller on random-init ViT-B models: does τ calibration land on the requested FLOPs?

Models (random init, no download):

* open_clip ``ViT-B-16`` (``pretrained=None``): one 224 px image + one 77-token caption
  (SOT, ``--words`` word ids, EOT, padding) -- the FLOPs case of the CrossGET/MADTP papers.
* Hugging Face ``BlipForImageTextRetrieval`` with its default (ViT-B/16, BERT-base) config at
  ``--blip-size`` px (default 224; BLIP's own 384 takes 8–46 s of calibration per target at
  ``--threads 1`` on the 2-core machine), ``initializer_range=0.02`` in the vision tower (BLIP's own
  1e-10 makes every weight ~0): one image + one 35-token caption (BLIP's retrieval length; [CLS], words, [SEP],
  padding), counted as the image-text matching forward (vision tower, then the text encoder
  cross-attending to it: where MADTP prunes the text before cross-attention).

For each ``flops_reduction`` MADTP is applied, :func:`vleff.calibrate_madtp` searches τ on the
batch, and the measured FLOPs (:func:`vleff.profile.count_flops`, whole forward, MADTP's own
codebook scoring included) are compared with ``baseline × (1 − flops_reduction)``; the
baseline is the unpatched model's count on the same batch. Throughput (interleaved, median,
one process, :func:`vleff.profile.measure_throughput`) is measured per tower, baseline vs MADTP
at ``--throughput-reduction``, batch 1 (the batch τ was calibrated on).

Random-init attention is near uniform, so the importance scores carry little signal; the
point here is that the controller reaches the FLOPs target from *measured* FLOPs anyway.

    python benchmarks/madtp_flops.py --out madtp_flops.json
    python benchmarks/madtp_flops.py --models open_clip --reductions 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import vleff
from vleff.backbones import find_pair, token_counts
from vleff.methods.madtp.core import pair_forward
from vleff.profile import count_flops, measure_throughput


def clip_caption(words: int, context: int = 77, vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, context, dtype=torch.long)
    ids[0, 0] = vocab - 2
    ids[0, 1 : words + 1] = torch.randint(1, vocab - 3, (words,), generator=g)
    ids[0, words + 1] = vocab - 1
    return ids


def blip_caption(words: int, context: int = 35, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, context, dtype=torch.long)
    ids[0, 0] = 101
    ids[0, 1 : words + 1] = torch.randint(1000, 30000, (words,), generator=g)
    ids[0, words + 1] = 102
    return ids, (ids != 0).long()


def build(name: str, words: int, blip_size: int = 224):
    torch.manual_seed(0)
    if name == "open_clip":
        import open_clip

        model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
        ids = clip_caption(words)
        return model, (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)), ids, None)
    if name == "blip":
        from transformers import BlipConfig, BlipForImageTextRetrieval

        cfg = BlipConfig(vision_config={"initializer_range": 0.02, "image_size": blip_size})
        model = BlipForImageTextRetrieval(cfg).eval()
        ids, mask = blip_caption(words)
        return model, (torch.randn(1, 3, blip_size, blip_size, generator=torch.Generator().manual_seed(0)), ids, mask)
    raise ValueError(f"model {name!r}: use open_clip or blip")


def tower_calls(model, batch):
    """Zero-argument callables running each tower alone (for throughput)."""
    pair = find_pair(model)
    images, ids, mask = batch
    if pair.family != "hf_blip":
        return {"image": lambda: pair.encode_image(images), "text": lambda: pair.encode_text(ids, mask)}
    image = model.vision_model(pixel_values=images).last_hidden_state.detach()
    enc = torch.ones(image.shape[:2], dtype=torch.long)
    return {
        "image": lambda: model.vision_model(pixel_values=images),
        "text": lambda: pair.text_tower.root(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image, encoder_attention_mask=enc
        ),
    }


def run(
    name: str, reductions: list[float], words: int, throughput_at: float | None, repeats: int, blip_size: int = 224
) -> list[dict]:
    model, batch = build(name, words, blip_size)
    plain = copy.deepcopy(model)
    pair = find_pair(plain)
    with torch.no_grad():
        baseline = count_flops(lambda: pair_forward(pair, batch))
    rows = []
    for p in reductions:
        vleff.apply_madtp(model, flops_reduction=p)
        start = time.perf_counter()
        result = vleff.calibrate_madtp(model, [batch])
        seconds = time.perf_counter() - start
        with torch.no_grad():
            pair_forward(find_pair(model), batch)
        counts = token_counts(model)
        row = {
            "model": name,
            "flops_reduction": p,
            "baseline_gflops": baseline / 1e9,
            "madtp_gflops": result.flops / 1e9,
            "ratio": result.flops / baseline,
            "target_ratio": 1 - p,
            "error_vs_target": result.error,
            "baseline_matches_unpatched": result.baseline == baseline,
            "tau": result.tau,
            "start": result.start,
            "evaluations": len(result.evaluations),
            "calibration_s": seconds,
            "image_tokens": counts.get("image"),
            "text_tokens": counts.get("text"),
        }
        if throughput_at is not None and abs(p - throughput_at) < 1e-9:
            base_calls, madtp_calls = tower_calls(plain, batch), tower_calls(model, batch)
            with torch.no_grad():
                for tower in ("image", "text"):
                    res = measure_throughput(
                        {"baseline": base_calls[tower], "madtp": madtp_calls[tower]},
                        items_per_call=1,
                        warmup=2,
                        repeats=repeats,
                        progress=False,
                    )
                    row[f"{tower}_speedup"] = res["madtp"].speedup
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["open_clip", "blip"])
    parser.add_argument("--reductions", nargs="+", type=float, default=[0.3, 0.5, 0.8])
    parser.add_argument("--words", type=int, default=12, help="word tokens of the caption")
    parser.add_argument(
        "--throughput-reduction",
        type=float,
        default=0.5,
        help="measure per-tower throughput at this flops_reduction (negative: skip)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--blip-size", type=int, default=224, help="BLIP image size (its own: 384)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's; 1 on a shared CPU avoids spin-waiting)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads={args.threads} is not allowed; use a positive int")
        torch.set_num_threads(args.threads)
    at = args.throughput_reduction if args.throughput_reduction >= 0 else None
    rows = [r for name in args.models for r in run(name, args.reductions, args.words, at, args.repeats, args.blip_size)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
