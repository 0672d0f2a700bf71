"""Shared pieces of the token-pruning methods (DynamicViT, EViT): locations, keep counts and
order-preserving top-k indices.

Prefix tokens (cls, distillation, registers) always survive in front; the surviving tokens
keep their original order, which keeps positional structure readable (visualisation, avg
pooling). The selection itself is :meth:`vleff.backbones.TokenState.select`, which gathers
every registered token field with the same indices.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


def default_locations(depth: int) -> list[int]:
    """Three evenly spaced blocks, ``(3, 6, 9)`` for depth 12; fewer for very shallow towers."""
    locs = sorted({max(1, (i * depth) // 4) for i in (1, 2, 3)} - {depth})
    return locs or [0]


def check_locations(name: str, locations: Sequence[int] | None, depth: int) -> list[int]:
    """Block indices in ``[0, depth)``, strictly increasing; ``None`` gives :func:`default_locations`."""
    if locations is None:
        return default_locations(depth)
    if isinstance(locations, (str, bytes)) or not isinstance(locations, Sequence):
        raise ValueError(f"{name}={locations!r} must be a sequence of block indices")
    locs = list(locations)
    if not locs:
        raise ValueError(f"{name}={locations!r} must name at least one block")
    for loc in locs:
        if not isinstance(loc, numbers.Integral) or isinstance(loc, bool) or not 0 <= loc < depth:
            raise ValueError(
                f"{name}={locations!r}: {loc!r} is not a block index in [0, {depth}) (the tower has {depth} blocks)"
            )
    if any(b <= a for a, b in zip(locs, locs[1:])):
        raise ValueError(f"{name}={locations!r} must be strictly increasing")
    return [int(loc) for loc in locs]


def count_for_ratio(n: int, ratio: float, rounding: str) -> int:
    """``ceil`` or ``floor`` of ``n·ratio`` robust to float noise (0.7·10 is 7, not 8), at least 1."""
    value = round(n * ratio, 6)
    k = math.ceil(value) if rounding == "ceil" else math.floor(value)
    return max(1, min(n, k))


def keep_indices(scores: torch.Tensor, k: int, num_prefix: int) -> torch.Tensor:
    """Indices ``[B, num_prefix + k]`` into the full sequence: the prefix, then the ``k``
    highest-scoring non-prefix tokens (``scores`` is ``[B, N - num_prefix]``) in original order."""
    top = scores.topk(k, dim=1).indices.sort(dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=scores.device).expand(scores.shape[0], num_prefix)
    return torch.cat([prefix, top], dim=1)
