"""GaLore's projection refresh: full thin SVD against randomized low-rank SVD (``torch.svd_lowrank``).

    python benchmarks/galore_svd.py results/galore_svd.json           # ViT-B shapes, rank 128
    python benchmarks/galore_svd.py out.json --rank 64 --repeats 3 --no-vit

For each ViT-B weight shape (``768x768``: attention output projection; ``768x3072``: MLP
``fc2``) and each kind of matrix, both refreshes of :func:`vleff.memory.galore_projection`
(``svd="full"`` and ``svd="lowrank"``) are timed (median of ``repeats`` after one warm-up, in
this process's torch threads) and their projectors compared:

* ``proj_dist`` — ``||P_full P_fullᵀ - P_lr P_lrᵀ||_F / sqrt(2r)``: 0 for the same subspace,
  1 for orthogonal ones;
* ``max_angle_deg`` — the largest principal angle between the two rank-``r`` subspaces;
* ``energy`` — ``||G P_lrᵀ||² / ||G P_fullᵀ||²``: the share of the gradient energy the full
  SVD's optimal subspace keeps that the low-rank one keeps too (what GaLore's moments see).

Matrices: ``gaussian`` (i.i.d. entries, a flat spectrum: the hard case for a randomized
method), ``decay1`` (singular values ``1/i``, random singular vectors), and ``vit_grad`` (the
real gradient of that weight in a random-init timm ``vit_base_patch16_224`` after one
cross-entropy backward on a batch of random images; skip with ``--no-vit``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {"768x768": (768, 768), "768x3072": (768, 3072)}
# weights of timm's ViT-B/16 with those shapes (out_features x in_features)
VIT_WEIGHTS = {"768x768": "blocks.0.attn.proj.weight", "768x3072": "blocks.0.mlp.fc2.weight"}


def _decaying(m: int, n: int, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen))
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float32)
    return (u * s) @ v.T


def vit_gradients(batch_size: int = 2, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of the :data:`VIT_WEIGHTS` after one backward of a random-init ViT-B/16, and
    the seconds that forward + backward took (the scale a refresh is amortized against)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 224, 224, generator=gen)
    labels = torch.randint(0, 1000, (batch_size,), generator=gen)
    start = time.perf_counter()
    torch.nn.functional.cross_entropy(model(images), labels).backward()
    seconds = time.perf_counter() - start
    params = dict(model.named_parameters())
    return {shape: params[name].grad.detach().clone() for shape, name in VIT_WEIGHTS.items()}, seconds


def compare(grad: torch.Tensor, rank: int, repeats: int) -> dict[str, Any]:
    """Time both refreshes on ``grad`` and compare their projectors (see the module docstring)."""
    from vleff.memory import galore_projection

    row: dict[str, Any] = {}
    projs = {}
    for svd in ("full", "lowrank"):
        galore_projection(grad, rank, svd=svd)  # warm-up (allocations, LAPACK workspace)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            proj, right = galore_projection(grad, rank, svd=svd)
            times.append(time.perf_counter() - start)
        projs[svd] = (proj if right else proj.T).double()  # rows span the subspace
        row[f"{svd}_ms"] = 1e3 * statistics.median(times)
    full, low = projs["full"], projs["lowrank"]
    r = full.shape[0]
    row["rank"] = r
    row["speedup"] = row["full_ms"] / row["lowrank_ms"]
    row["proj_dist"] = float(torch.linalg.matrix_norm(full.T @ full - low.T @ low) / math.sqrt(2 * r))
    cosines = torch.linalg.svdvals(full @ low.T).clamp(max=1.0)
    row["max_angle_deg"] = float(torch.rad2deg(torch.arccos(cosines.min())))
    g = grad.double()
    right = grad.shape[0] >= grad.shape[1]  # the side proj_type="std" projects on
    kept = {k: float(torch.linalg.matrix_norm(g @ p.T if right else p @ g) ** 2) for k, p in projs.items()}
    row["energy"] = kept["lowrank"] / kept["full"]
    return row


def run(rank: int = 128, repeats: int = 5, vit: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(seed)
    matrices: dict[str, dict[str, torch.Tensor]] = {
        "gaussian": {k: torch.randn(*s, generator=gen) for k, s in SHAPES.items()},
        "decay1": {k: _decaying(*s, gen) for k, s in SHAPES.items()},
    }
    if vit:
        print("computing the random-init ViT-B/16 gradients ...", flush=True)
        matrices["vit_grad"], seconds = vit_gradients(seed=seed)
        print(f"ViT-B/16 forward + backward, batch 2, 224 px: {seconds:.2f} s", flush=True)
    rows = []
    for kind, by_shape in matrices.items():
        for shape, grad in by_shape.items():
            row = {"shape": shape, "matrix": kind, **compare(grad, rank, repeats)}
            rows.append(row)
            print(
                f"{shape:>9} {kind:>9}: full {row['full_ms']:7.1f} ms, lowrank {row['lowrank_ms']:6.1f} ms "
                f"({row['speedup']:.1f}x), proj_dist {row['proj_dist']:.3f}, max angle "
                f"{row['max_angle_deg']:.1f} deg, energy {row['energy']:.4f}",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", help="JSON file for the rows")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-vit", action="store_true", help="skip the real ViT-B gradients")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.repeats < 1:
        parser.error(f"--rank={args.rank} and --repeats={args.repeats} must both be >= 1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}", flush=True)
    rows = run(args.rank, args.repeats, vit=not args.no_vit)
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "command": " ".join(["python", *sys.argv]),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
