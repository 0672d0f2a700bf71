"""FLOP formulas for vleff's custom ops, so ``FlopCounterMode`` counts the Triton paths.

Importing this module registers them in torch's global registry
(``torch.utils.flop_counter.register_flop_formula``); ``vleff.profile.flops`` imports it
before counting. Triton need not be installed: the ops are defined in
:mod:`vleff.kernels.custom_ops`, which imports Triton only when an op runs.

Convention (torch's, so both backends count the same): a multiply-add is 2 FLOPs and only
matrix products count. Hence

* ``tome_best_match``: ``2·B·Na·Nb·C``, what the reference's ``A @ Bᵀ`` (``aten.bmm``)
  counts; the norms and the max are not counted, as the reference's are not;
* the merge ops (forward and backward): **no formula** = 0, like the reference's gathers,
  scatter-adds and divisions, which torch does not count either;
* ``lowrank_project`` / ``lowrank_project_back``: ``2·m·n·r`` (one ``aten.mm``);
* ``galore_adam_step``: ``4·m·n·r`` (the two products; the Adam epilogue is elementwise).

So a FLOP table compares equal work whichever backend ran, e.g. a ToMe model counts the
same on the reference path and on the Triton path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula

from vleff.kernels import custom_ops  # noqa: F401  (defines torch.ops.vleff.*)

__all__ = ["galore_step_flops", "lowrank_flops", "tome_best_match_flops"]


def tome_best_match_flops(metric_shape: Sequence[int], *args, out_shape=None, **kwargs) -> int:
    """``2·B·Na·Nb·C`` for a ``[B, N, C]`` metric (A = even tokens, B = odd tokens)."""
    bsz, n, c = metric_shape
    return 2 * bsz * ((n + 1) // 2) * (n // 2) * c


def _rank(proj_shape: Sequence[int], side: str) -> int:
    return proj_shape[0] if side == "right" else proj_shape[1]


def lowrank_flops(x_shape: Sequence[int], proj_shape: Sequence[int], side: str, *args, out_shape=None, **kwargs) -> int:
    """``2·m·n·r`` for a projection or back-projection (``out_shape`` or ``x_shape`` is [m, n])."""
    rank = _rank(proj_shape, side)
    full = proj_shape[1] if side == "right" else proj_shape[0]
    other = x_shape[0] if side == "right" else x_shape[1]
    return 2 * full * other * rank


def galore_step_flops(
    param_shape: Sequence[int],
    grad_shape: Sequence[int],
    proj_shape: Sequence[int],
    exp_avg_shape: Sequence[int],
    exp_avg_sq_shape: Sequence[int],
    side: str,
    *args,
    out_shape=None,
    **kwargs,
) -> int:
    """``4·m·n·r``: projection plus back-projection of an ``[m, n]`` weight."""
    m, n = param_shape
    return 4 * m * n * _rank(proj_shape, side)


def _register(op: torch._ops.OpOverloadPacket, formula: Callable[..., int]) -> None:
    if op not in flop_registry:  # idempotent (module reloads, a second import path)
        register_flop_formula(op)(formula)


_register(torch.ops.vleff.tome_best_match, tome_best_match_flops)
_register(torch.ops.vleff.lowrank_project, lowrank_flops)
_register(torch.ops.vleff.lowrank_project_back, lowrank_flops)
_register(torch.ops.vleff.galore_adam_step, galore_step_flops)
