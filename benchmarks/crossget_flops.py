"""FLOPs (and CPU throughput) of CrossGET on open_clip ViT-B-16, both towers (random init, no download).

One 224 px image and one 77-token caption (SOT, ``--words`` words, EOT, padding), counted with
:func:`vleff.profile.count_flops` for ``encode_image`` + ``encode_text`` together, as the
reference's figures are (fvcore, CLIP ViT-B/16: 58.5 % of the baseline at ``r_image=16``,
51.6 % at ``r_image=16, r_text=6``)::

    python benchmarks/crossget_flops.py                     # FLOPs table
    python benchmarks/crossget_flops.py --throughput        # + interleaved CPU throughput per tower
    python benchmarks/crossget_flops.py --out crossget.json

Throughput: eval mode, no grad, one process, each candidate a separate model copy, timed in
interleaved rounds (:func:`vleff.profile.measure_throughput`, median of ``--repeats``); the
per-round speed-ups (baseline time / CrossGET time within a round) are printed with their range.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from text_tower_flops import caption_ids  # same folder: one caption layout for both benchmarks

import vleff
from vleff.profile import count_flops
from vleff.profile.throughput import measure_throughput

REFERENCE = {
    "baseline": 1.0,
    "r_image=16": 12.036 / 20.567,
    "r_text=6": 19.275 / 20.567,
    "r_image=16, r_text=6": 10.612 / 20.567,
}


def both_towers(model, image, ids):
    def run():
        model.encode_image(image)
        model.encode_text(ids)

    return run


def round_ratios(base, other) -> list[float]:
    """Per-round speed-ups ``t_base / t_other``: both ran in the same interleaved round, so the
    spread of these is the spread a reader should trust the median ratio within."""
    return [b / o for b, o in zip(base.times_s, other.times_s)]


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--words", type=int, default=15, help="real word tokens in the caption (max 75)")
    parser.add_argument("--throughput", action="store_true", help="also time each tower on the CPU")
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.words <= 75:
        parser.error(f"--words={args.words} must be in [1, 75]")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval()
    image = torch.randn(1, 3, 224, 224)
    ids = caption_ids(1, args.words)
    settings = {
        "baseline": None,
        "r_image=16": {"r_image": 16, "r_text": 0},
        "r_text=6": {"r_image": 0, "r_text": 6},
        "r_image=16, r_text=6": {"r_image": 16, "r_text": 6},
    }
    rows = []
    base = None
    for label, kwargs in settings.items():
        if kwargs is not None:
            vleff.apply_crossget(model, **kwargs)
        image_flops = count_flops(model.encode_image, image)
        text_flops = count_flops(model.encode_text, ids)
        total = image_flops + text_flops
        base = base or total
        counts = vleff.token_counts(model)
        rows.append(
            {
                "setting": label,
                "gflops": total / 1e9,
                "image_gflops": image_flops / 1e9,
                "text_gflops": text_flops / 1e9,
                "ratio": total / base,
                "reference_ratio": REFERENCE[label],
                "image_tokens": counts.get("image"),
                "text_tokens": counts.get("text"),
            }
        )
        if kwargs is not None:
            vleff.remove_crossget(model)
    print(f"open_clip {args.model} (random init): one 224 px image + one 77-token caption ({args.words} words)")
    print(f"{'setting':<24}{'GFLOPs':>9}{'image':>9}{'text':>9}{'ratio':>8}{'reference':>11}")
    for r in rows:
        print(
            f"{r['setting']:<24}{r['gflops']:>9.3f}{r['image_gflops']:>9.3f}{r['text_gflops']:>9.3f}"
            f"{r['ratio']:>8.3f}{r['reference_ratio']:>11.3f}"
        )
    for r in rows[1:]:
        print(f"  {r['setting']}: image tokens per block {r['image_tokens']}, text {r['text_tokens']}")

    result = {"model": args.model, "words": args.words, "flops": rows}
    if args.throughput:
        images = torch.randn(args.image_batch, 3, 224, 224)
        texts = caption_ids(args.text_batch, args.words)
        fast = vleff.apply_crossget(copy.deepcopy(model), r_image=16, r_text=6)
        with torch.no_grad():
            img = measure_throughput(
                {
                    "baseline": lambda: model.encode_image(images),
                    "crossget r_image=16": lambda: fast.encode_image(images),
                },
                items_per_call=args.image_batch,
                repeats=args.repeats,
                progress=False,
            )
            txt = measure_throughput(
                {"baseline": lambda: model.encode_text(texts), "crossget r_text=6": lambda: fast.encode_text(texts)},
                items_per_call=args.text_batch,
                repeats=args.repeats,
                progress=False,
            )
        print(f"CPU throughput ({torch.get_num_threads()} threads, interleaved, median of {args.repeats}):")
        spread = {}
        for tower, res in (("image", img), ("text", txt)):
            for name, r in res.items():
                print(
                    f"  {tower:<6}{name:<22}{r.items_per_s:>9.2f} /s  x{r.speedup:.2f}  "
                    f"(call {min(r.times_s):.3f}-{max(r.times_s):.3f} s)"
                )
            spread[tower] = round_ratios(*res.values())
            print(
                f"  {tower:<6}per-round speed-up: min x{min(spread[tower]):.2f}, "
                f"median x{statistics.median(spread[tower]):.2f}, max x{max(spread[tower]):.2f}"
            )
        result["throughput"] = {
            "threads": torch.get_num_threads(),
            "image_batch": args.image_batch,
            "text_batch": args.text_batch,
            "image": {k: v.as_dict() for k, v in img.items()},
            "text": {k: v.as_dict() for k, v in txt.items()},
            "round_speedups": spread,
        }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
