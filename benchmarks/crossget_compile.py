"""Does CrossGET's *text* path run under ``torch.compile``, and does it equal eager?

    python benchmarks/crossget_compile.py                  # open_clip, HF CLIP, BLIP text towers
    python benchmarks/crossget_compile.py --families open_clip

The conformance suite compiles every token method's image tower (CrossGET's in one graph).
This checks the text towers of the test suite's tiny models (``tests/families.py``) with
``r_image=2, r_text=4``: ``torch._dynamo.explain`` counts the graph breaks, then the forward is
compiled with ``fullgraph=False`` (backends ``aot_eager`` and ``eager``) and compared with the
eager output. Not in the test suite: compiling a text tower with its graph breaks takes
20-50 s per family on the shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

FAMILIES_WITH_TEXT = ("open_clip", "hf_clip", "hf_blip")


def check(family: str, backends: tuple[str, ...]) -> dict:
    import torch._dynamo
    from families import FAMILIES

    import vleff

    torch.manual_seed(0)
    fam = FAMILIES[family]
    model = fam.make().eval()
    vleff.apply_crossget(model, r_image=2, r_text=4)
    fwd = fam.forwards["text"]
    row: dict = {"family": family}
    with torch.no_grad():
        ref = fwd(model)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(fwd)(model)
        row["graph_breaks"] = explanation.graph_break_count
        row["break_reasons"] = sorted({str(r.reason).splitlines()[0] for r in explanation.break_reasons})
        for backend in backends:
            torch._dynamo.reset()
            start = time.perf_counter()
            out = torch.compile(fwd, backend=backend, fullgraph=False)(model)
            row[f"{backend}_s"] = time.perf_counter() - start
            row[f"{backend}_max_abs_diff"] = float((out - ref).abs().max())
    torch._dynamo.reset()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES_WITH_TEXT, default=list(FAMILIES_WITH_TEXT))
    parser.add_argument("--backends", nargs="+", default=["aot_eager", "eager"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for family in args.families:
        row = check(family, tuple(args.backends))
        diffs = ", ".join(
            f"{b}: max |compiled - eager| {row[f'{b}_max_abs_diff']:.2e} ({row[f'{b}_s']:.0f} s)" for b in args.backends
        )
        print(f"{family} text tower: {row['graph_breaks']} graph breaks; {diffs}")
        for reason in row["break_reasons"]:
            print(f"    break: {reason}")


if __name__ == "__main__":
    main()
