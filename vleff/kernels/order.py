"""Stable ordering that exports: ``argsort(stable=True)`` everywhere, the same order by counting
while a model is exported.

Token methods rank tokens (ToMe's edges, EViT's and MADTP's scores, CrossGET's sources) with a
*stable* sort, so ties keep their index order and a plan never depends on the sort implementation.
ONNX has no stable sort (the dynamo exporter has no translation for ``aten.sort.stable``), so
while ``torch.export`` traces a model (ONNX export runs it) the order is computed from each
entry's rank: the number of entries that come before it. That is ``O(N²)`` comparisons per row,
cheap beside attention at token counts (≤ a few hundred), and gives exactly the same order.
"""

from __future__ import annotations

import torch


def stable_argsort(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``values.argsort(dim=-1, descending=descending, stable=True)``."""
    if not torch.compiler.is_exporting():
        return values.argsort(dim=-1, descending=descending, stable=True)
    index = torch.arange(values.shape[-1], device=values.device)
    a, b = values[..., :, None], values[..., None, :]
    ahead = b > a if descending else b < a
    before = ahead | ((b == a) & (index[None, :] < index[:, None]))  # [..., i, j]: j comes before i
    rank = before.sum(dim=-1)
    return torch.empty_like(rank).scatter_(-1, rank, index.expand_as(rank))
