"""``torch.library`` custom ops wrapping vleff's Triton kernels.

Why custom ops rather than bare kernel launches inside ``torch.autograd.Function``s:

* ``FlopCounterMode`` (and every other ``TorchDispatchMode``) only sees dispatcher ops; a
  raw Triton launch is invisible to it and would count 0 FLOPs. As ``torch.ops.vleff.*``
  ops they get formulas in :mod:`vleff.kernels.flops`.
* autograd is attached with ``register_autograd`` (the custom-op equivalent of an
  ``autograd.Function``), and fake implementations let ``torch.compile`` trace through.

Importing this module never imports Triton: the implementations import the launchers
lazily, so ``vleff.kernels.flops`` (which imports this module) works on machines without
Triton. The kernels themselves are in :mod:`vleff.kernels.triton_tome` and
:mod:`vleff.kernels.triton_lowrank`.

Ops (all functional, no mutation, except ``galore_adam_step``):

* ``vleff::tome_best_match(metric, num_protected) -> (node_max, node_idx)``
* ``vleff::tome_merge_sum(t, base, seg_start, seg_end, srcs, out_row) -> out``
* ``vleff::tome_merge_weighted(x, size, base, seg_start, seg_end, srcs, out_row) -> (out, out_size)``
* ``vleff::tome_merge_backward(grad_out, out_row, weight?, n_dtype_like) -> grad_in``
* ``vleff::lowrank_project(grad, proj, side) -> low_rank``
* ``vleff::lowrank_project_back(low_rank, proj, side) -> full``
* ``vleff::galore_adam_step(param!, grad, proj, exp_avg!, exp_avg_sq!, side, ...) -> ()``
"""

from __future__ import annotations

import torch
from torch.library import custom_op

# --------------------------------------------------------------------------------------
# ToMe
# --------------------------------------------------------------------------------------


@custom_op("vleff::tome_best_match", mutates_args=())
def tome_best_match(metric: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise max / argmax of ToMe's A·Bᵀ cosine similarities (no score matrix in memory)."""
    from vleff.kernels.triton_tome import best_match_launch

    return best_match_launch(metric, num_protected)


@tome_best_match.register_fake
def _(metric: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, n = metric.shape[:2]
    na = (n + 1) // 2
    return (metric.new_empty(bsz, na, dtype=torch.float32), metric.new_empty(bsz, na, dtype=torch.int64))


@custom_op("vleff::tome_merge_sum", mutates_args=())
def tome_merge_sum(
    t: torch.Tensor,
    base: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    srcs: torch.Tensor,
    out_row: torch.Tensor,
) -> torch.Tensor:
    """Sum every merge group of ``t`` into one row (see ``triton_tome.MergeIndex``)."""
    from vleff.kernels.triton_tome import merge_fwd_launch

    return merge_fwd_launch(t, None, base, seg_start, seg_end, srcs)[0]


@tome_merge_sum.register_fake
def _(t, base, seg_start, seg_end, srcs, out_row):
    return t.new_empty(t.shape[0], base.shape[1], t.shape[2])


@custom_op("vleff::tome_merge_weighted", mutates_args=())
def tome_merge_weighted(
    x: torch.Tensor,
    size: torch.Tensor,
    base: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    srcs: torch.Tensor,
    out_row: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean of every merge group of ``x`` and the summed sizes."""
    from vleff.kernels.triton_tome import merge_fwd_launch

    out, out_size = merge_fwd_launch(x, size, base, seg_start, seg_end, srcs)
    return out, out_size


@tome_merge_weighted.register_fake
def _(x, size, base, seg_start, seg_end, srcs, out_row):
    n_out = base.shape[1]
    return x.new_empty(x.shape[0], n_out, x.shape[2]), size.new_empty(size.shape[0], n_out, 1)


@custom_op("vleff::tome_merge_backward", mutates_args=())
def tome_merge_backward(
    grad_out: torch.Tensor, out_row: torch.Tensor, weight: torch.Tensor | None, like: torch.Tensor
) -> torch.Tensor:
    """``grad_in[b, i] = grad_out[b, out_row[b, i]] * weight[b, i]`` in ``like``'s dtype."""
    from vleff.kernels.triton_tome import merge_bwd_launch

    return merge_bwd_launch(grad_out, out_row, weight, like.dtype)


@tome_merge_backward.register_fake
def _(grad_out, out_row, weight, like):
    return grad_out.new_empty(grad_out.shape[0], out_row.shape[1], grad_out.shape[2], dtype=like.dtype)


def _merge_sum_setup(ctx, inputs, output) -> None:
    t, *_, out_row = inputs
    ctx.save_for_backward(out_row)
    ctx.t_meta = torch.empty(0, dtype=t.dtype, device=t.device)


def _merge_sum_backward(ctx, grad_out):
    (out_row,) = ctx.saved_tensors
    grad_t = tome_merge_backward(grad_out, out_row, None, ctx.t_meta)
    return grad_t, None, None, None, None, None


tome_merge_sum.register_autograd(_merge_sum_backward, setup_context=_merge_sum_setup)


def _merge_weighted_setup(ctx, inputs, output) -> None:
    x, size, *_, out_row = inputs
    out, out_size = output
    ctx.size_grad = size.requires_grad
    # x and the merged output are only needed for d/d(size); keep them alive only then.
    keep = (x, out) if ctx.size_grad else (None, None)
    ctx.save_for_backward(size, out_size, out_row, *keep)
    ctx.x_meta = torch.empty(0, dtype=x.dtype, device=x.device)


def _gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _merge_weighted_backward(ctx, grad_out, grad_out_size):
    size, out_size, out_row, x, out = ctx.saved_tensors
    group_size = _gather_tokens(out_size, out_row).float()  # S of the group each token is in
    weight = size.float() / group_size
    grad_x = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_x = tome_merge_backward(grad_out, out_row, weight, ctx.x_meta)
    grad_size = None
    if ctx.size_grad:
        # out_j = Σ s_i x_i / S_j  =>  d out_j / d s_i = (x_i - out_j) / S_j ;  d S_j / d s_i = 1
        grad_size = torch.zeros_like(size, dtype=torch.float32)
        if grad_out is not None:
            g = _gather_tokens(grad_out.float(), out_row)
            diff = x.float() - _gather_tokens(out.float(), out_row)
            grad_size = grad_size + (g * diff).sum(-1, keepdim=True) / group_size
        if grad_out_size is not None:
            grad_size = grad_size + _gather_tokens(grad_out_size.float(), out_row)
        grad_size = grad_size.to(size.dtype)
    return grad_x, grad_size, None, None, None, None, None


tome_merge_weighted.register_autograd(_merge_weighted_backward, setup_context=_merge_weighted_setup)

# --------------------------------------------------------------------------------------
# low-rank projection (GaLore)
# --------------------------------------------------------------------------------------


def _low_rank_shape(grad: torch.Tensor, proj: torch.Tensor, side: str) -> tuple[int, int]:
    return (grad.shape[0], proj.shape[0]) if side == "right" else (proj.shape[1], grad.shape[1])


def _full_shape(low_rank: torch.Tensor, proj: torch.Tensor, side: str) -> tuple[int, int]:
    return (low_rank.shape[0], proj.shape[1]) if side == "right" else (proj.shape[0], low_rank.shape[1])


@custom_op("vleff::lowrank_project", mutates_args=())
def lowrank_project(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``grad @ projᵀ`` (right) or ``projᵀ @ grad`` (left), fp32 accumulation."""
    from vleff.kernels.triton_lowrank import project_launch

    return project_launch(grad, proj, side)


@lowrank_project.register_fake
def _(grad, proj, side):
    return grad.new_empty(_low_rank_shape(grad, proj, side), dtype=torch.promote_types(grad.dtype, proj.dtype))


@custom_op("vleff::lowrank_project_back", mutates_args=())
def lowrank_project_back(low_rank: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """``low_rank @ proj`` (right) or ``proj @ low_rank`` (left), fp32 accumulation."""
    from vleff.kernels.triton_lowrank import project_back_launch

    return project_back_launch(low_rank, proj, side)


@lowrank_project_back.register_fake
def _(low_rank, proj, side):
    return low_rank.new_empty(_full_shape(low_rank, proj, side), dtype=torch.promote_types(low_rank.dtype, proj.dtype))


@custom_op("vleff::galore_adam_step", mutates_args=("param", "exp_avg", "exp_avg_sq"))
def galore_adam_step(
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
    """One fused GaLore-AdamW step (see ``triton_ops.galore_adam_step_triton``)."""
    from vleff.kernels.triton_lowrank import galore_adam_step_launch

    galore_adam_step_launch(
        param, grad, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale
    )


@galore_adam_step.register_fake
def _(param, grad, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale):
    return None
