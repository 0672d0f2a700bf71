"""Shared pieces of the token-pruning methods (DynamicViT, EViT): argument checks and
order-preserving token selection that keeps the :class:`~vleff.backbones.TokenState` in step.

Both methods decide per block which tokens survive; everything that is indexed by token
(``x``, sizes, source map, keep mask) must be gathered with the same indices, and prefix
tokens (cls, distillation, registers) must always survive in front. Keeping the surviving
tokens in their original order keeps positional structure readable (visualisation, avg pooling).
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

from vleff.backbones import TokenState


def check_ratio(name: str, value: object) -> float:
    """``value`` as a float in (0, 1]; ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < float(value) <= 1:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]")
    return float(value)


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
            raise ValueError(f"{name}={locations!r}: {loc!r} is not a block index in [0, {depth}) "
                             f"(the tower has {depth} blocks)")
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


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b]]`` for a ``[B, N, ...]`` tensor."""
    index = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, index)


def select_tokens(x: torch.Tensor, state: TokenState, idx: torch.Tensor) -> torch.Tensor:
    """Keep tokens ``idx`` of ``x`` and of every per-token field of ``state``."""
    if state.size is not None:
        state.size = gather_tokens(state.size, idx)
    if state.source is not None:
        state.source = gather_tokens(state.source, idx)
    if state.keep is not None:
        state.keep = gather_tokens(state.keep, idx)
    return gather_tokens(x, idx)
