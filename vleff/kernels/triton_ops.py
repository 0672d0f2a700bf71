"""The Triton path's Python API: vleff's kernels called through their registered ops.

Each function checks its inputs and calls ``torch.ops.vleff.*`` (:mod:`vleff.kernels.custom_ops`,
imported here so the ops exist), so autograd, ``torch.compile`` and FLOP counting see an op, not a
raw launch. The dispatching functions (:mod:`vleff.kernels.tome`, :mod:`vleff.kernels.lowrank`,
:mod:`vleff.kernels.galore_step`) call these when the backend is Triton. Layering inside the
package: ``plan``/``lowrank_reference`` < ``triton_tome``/``triton_lowrank`` (launchers) <
``custom_ops`` < ``triton_ops`` < the dispatchers; no module imports one above it.
"""

from __future__ import annotations

import torch

from vleff.kernels import custom_ops  # noqa: F401  (registers torch.ops.vleff.*)
from vleff.kernels.lowrank_reference import project_back_reference, project_reference
from vleff.kernels.plan import MergePlan, max_merge, plan_from_best_match
from vleff.kernels.triton_lowrank import _check_pair
from vleff.kernels.triton_tome import _check_merge_input, merge_index


def _identity_plan(bsz: int, num_tokens: int, num_protected: int, device: torch.device) -> MergePlan:
    """The r = 0 plan (what the reference returns for r = 0), built without any kernel."""
    na = (num_tokens + 1) // 2
    empty = torch.empty(bsz, 0, dtype=torch.int64, device=device)
    unm = torch.arange(na, device=device).expand(bsz, na).contiguous()
    return MergePlan(empty, empty.clone(), unm, num_protected, num_tokens)


def bipartite_soft_matching_triton(metric: torch.Tensor, r: int, num_protected: int) -> MergePlan:
    """Triton version of :func:`vleff.kernels.tome.bipartite_soft_matching_reference`."""
    num_tokens = metric.shape[1]
    r = min(r, max_merge(num_tokens, num_protected))
    if r == 0:
        return _identity_plan(metric.shape[0], num_tokens, num_protected, metric.device)
    node_max, node_idx = torch.ops.vleff.tome_best_match(metric, num_protected)
    return plan_from_best_match(node_max, node_idx, r, num_protected, num_tokens)


def merge_sum_triton(t: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Triton version of :func:`vleff.kernels.tome.merge_sum_reference` (differentiable in ``t``)."""
    if plan.r == 0:
        return t
    index = merge_index(plan)
    _check_merge_input("t", t, index)
    return torch.ops.vleff.tome_merge_sum(t, index.base, index.seg_start, index.seg_end, index.srcs, index.out_row)


def merge_weighted_triton(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`vleff.kernels.tome.merge_weighted_reference`.

    One pass writes the weighted mean of every group and its total size; accumulation in
    fp32 (the reference accumulates ``x * size`` in ``x.dtype``, so in fp16/bf16 the Triton
    result is the more accurate one). Differentiable in ``x`` and in ``size``.
    """
    if plan.r == 0:
        return x, size
    index = merge_index(plan)
    _check_merge_input("x", x, index)
    if size.shape != (*x.shape[:2], 1):
        raise ValueError(f"size must be [B, N, 1] = {(*x.shape[:2], 1)}; got shape {tuple(size.shape)}")
    if not size.is_floating_point():
        raise ValueError(f"size must be floating point; got dtype {size.dtype}")
    out, out_size = torch.ops.vleff.tome_merge_weighted(
        x, size, index.base, index.seg_start, index.seg_end, index.srcs, index.out_row
    )
    return out, out_size


def project_triton(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """Triton version of :func:`vleff.kernels.lowrank.project_reference`.

    Unlike the reference it accepts different float dtypes for ``grad`` and ``proj`` (the
    result has their promoted dtype). Not differentiable (GaLore projects gradients).
    """
    _check_pair("grad", grad, proj, side, low_rank=False)
    if torch.float64 in (grad.dtype, proj.dtype):
        return project_reference(grad.double(), proj.double(), side)
    return torch.ops.vleff.lowrank_project(grad, proj, side)


def project_back_triton(low_rank: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """Triton version of :func:`vleff.kernels.lowrank.project_back_reference` (mixed dtypes allowed)."""
    _check_pair("low_rank", low_rank, proj, side, low_rank=True)
    if torch.float64 in (low_rank.dtype, proj.dtype):
        return project_back_reference(low_rank.double(), proj.double(), side)
    return torch.ops.vleff.lowrank_project_back(low_rank, proj, side)


def galore_adam_step_triton(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    side: str,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """Triton version of :func:`vleff.kernels.galore_step.galore_adam_step_reference` (in place)."""
    torch.ops.vleff.galore_adam_step(
        param, grad, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale
    )
