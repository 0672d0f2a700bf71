"""Training memory of CLIP with AdamW, GaLore and MeZO (open_clip ViT-B-32, random init, fp32).

    python benchmarks/clip_memory.py results/clip_memory.json            # ViT-B-32, batch 32, rank 128
    python benchmarks/clip_memory.py out.json --model RN50 --batch-size 8 --rank 64

A thin command line over :mod:`vleff.cli.training_memory` (also ``vleff-bench memory``),
which documents the methods and what is measured. Every method runs in its own fresh Python
process unless ``--no-isolate``.
"""

from __future__ import annotations

import argparse
import sys

from vleff.cli.training_memory import METHODS, print_memory_rows, run_training_memory
from vleff.profile.report import rows_to_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="JSON file to write the rows to, e.g. results/clip_memory.json")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name or CLIP config .json (random init)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=128, help="GaLore rank")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--no-isolate", action="store_true", help="measure every method in this process")
    args = parser.parse_args(argv)
    try:
        rows = run_training_memory(
            args.model, args.batch_size, args.rank, args.device, args.methods, isolate=not args.no_isolate
        )
    except ValueError as err:
        parser.error(str(err))
    print_memory_rows(rows)
    path = rows_to_json(
        rows,
        args.output,
        benchmark="clip_memory",
        model=args.model,
        batch_size=args.batch_size,
        rank=args.rank,
        device=args.device,
        command=" ".join(["python", *sys.argv]),
    )
    print(f"rows written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
