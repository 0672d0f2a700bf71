"""FLOPs of the open_clip ViT-B-32 text tower with ToMe and EViT on text (random init, no download).

One 77-token caption batch: each caption has ``--words`` real tokens (SOT + words + EOT) and
padding after its EOT, as open_clip's tokenizer gives. FLOPs are counted with
:func:`vleff.profile.count_flops` (``FlopCounterMode`` plus the fused-attention formulas),
so the ratio is what the text tower really executes, padding included.

    python benchmarks/text_tower_flops.py                       # table
    python benchmarks/text_tower_flops.py --out text_flops.json

The padding tokens are merged among themselves (never with real tokens), so for short
captions most merges at moderate r land on padding: the FLOPs fall while the caption's own
tokens stay unmerged. ``--words 75`` shows a full-length caption.
"""

from __future__ import annotations

import argparse
import json

import torch

import vleff
from vleff.profile import count_flops


def caption_ids(batch: int, words: int, context: int = 77, vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """``[batch, context]`` ids: SOT, ``words`` random word ids, EOT (the largest id), zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, context, dtype=torch.long)
    ids[:, 0] = vocab - 2
    ids[:, 1 : words + 1] = torch.randint(1, vocab - 3, (batch, words), generator=g)
    ids[:, words + 1] = vocab - 1
    return ids


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--words", type=int, default=15, help="real word tokens per caption (max 75)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    if not 1 <= args.words <= 75:
        parser.error(f"--words={args.words} must be in [1, 75]")

    model = open_clip.create_model(args.model, pretrained=None).eval()
    ids = caption_ids(args.batch, args.words)
    encode = model.encode_text
    base = count_flops(encode, ids)
    settings = (
        [("baseline", None, {})]
        + [("tome", "tome", {"r": r}) for r in (2, 4, 6, 8)]
        + [("evit", "evit", {"keep_rate": k, "locations": [3, 6, 9]}) for k in (0.7, 0.5)]
    )
    rows = []
    for label, name, kwargs in settings:
        if name is not None:
            vleff.get_method(name).apply(model, towers="text", **kwargs)
        flops = count_flops(encode, ids)
        counts = vleff.token_counts(model).get("text", [ids.shape[1]] * 12)
        rows.append(
            {"method": label, **kwargs, "gflops": flops / 1e9, "ratio": flops / base, "tokens_last_block": counts[-1]}
        )
        if name is not None:
            vleff.get_method(name).remove(model)
    print(f"open_clip {args.model} text tower, 77-token context, {args.words} words + SOT/EOT, batch {args.batch}")
    print(f"{'method':<10}{'setting':<36}{'GFLOPs':>9}{'ratio':>8}{'tokens@last':>13}")
    for row in rows:
        setting = ", ".join(f"{k}={row[k]}" for k in ("r", "keep_rate", "locations") if k in row)
        print(
            f"{row['method']:<10}{setting:<36}{row['gflops']:>9.3f}{row['ratio']:>8.3f}{row['tokens_last_block']:>13}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
