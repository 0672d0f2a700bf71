"""One GaLore-AdamW update of one 2-D weight: project, Adam in rank r, back-project, apply.

This is the op the Triton path fuses (:func:`vleff.kernels.triton_ops.galore_adam_step_triton`);
the reference below is the contract. The formula is torch ``AdamW``'s (decoupled decay
first, ``eps`` added after the bias-corrected square root) with the moments living in
the projected space and the update scaled by GaLore's ``scale`` (alpha):

    R  = project(G, P)                                 # [m, r] (right) or [r, n] (left)
    m  = b1·m + (1 - b1)·R ;  v = b2·v + (1 - b2)·R²    # fp32, in place
    N  = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)
    W  = W·(1 - lr·wd) - lr·scale·project_back(N, P)

(The GaLore paper's released optimizer adds ``eps`` before the bias correction and decays
after the update; vleff follows torch so that a group without projection equals AdamW.)
"""

from __future__ import annotations

import math

import torch

from vleff.kernels.dispatch import kernel_backend
from vleff.kernels.lowrank import (
    Side,
    _check_side,
    project_back_reference,
    project_reference,
)


def _check_step_args(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    side: str,
    step: int,
) -> None:
    _check_side(side)
    if param.dim() != 2 or grad.shape != param.shape:
        raise ValueError(f"param and grad must be the same 2-D shape; got {tuple(param.shape)} and {tuple(grad.shape)}")
    m, n = param.shape
    want_proj = (proj.shape[0], n) if side == "right" else (m, proj.shape[1])
    if proj.dim() != 2 or tuple(proj.shape) != want_proj:
        raise ValueError(
            f"proj shape {tuple(proj.shape)} does not fit param {tuple(param.shape)} for side={side!r} "
            f"(expected [r, {n}] for 'right', [{m}, r] for 'left')"
        )
    rank = proj.shape[0] if side == "right" else proj.shape[1]
    low = (m, rank) if side == "right" else (rank, n)
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if tuple(t.shape) != low or t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 of shape {low}; got {t.dtype} {tuple(t.shape)}")
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (the count after this update)")


def galore_adam_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    side: Side,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """PyTorch reference of the fused step; updates ``param``, ``exp_avg``, ``exp_avg_sq`` in place."""
    _check_step_args(param, grad, proj, exp_avg, exp_avg_sq, side, step)
    with torch.no_grad():
        low = project_reference(grad.float(), proj.float(), side)
        galore_adam_step_projected(
            param, low, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale
        )


def galore_adam_step_projected(
    param: torch.Tensor,
    low: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    side: Side,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
) -> None:
    """The step after the projection: Adam on the projected gradient ``low`` (fp32, in place on
    the moments), back-projection with ``proj`` and the AdamW update of ``param``.

    Split from the reference for a weight sharded by rows (FSDP2), whose left projection
    ``Pᵀ G`` sums over rows every rank holds a part of: the ranks add their partial products,
    then each applies this step to its own rows with its rows of ``P``."""
    with torch.no_grad():
        exp_avg.mul_(beta1).add_(low, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
        norm = exp_avg / (1.0 - beta1**step) / denom
        update = project_back_reference(norm, proj.float(), side)
        new = param.float().mul_(1.0 - lr * weight_decay).sub_(update, alpha=lr * scale)
        param.copy_(new)


def galore_adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    side: Side,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    scale: float,
    backend: str | None = None,
) -> None:
    """Apply one GaLore-AdamW update to a 2-D ``param`` in place (see the module docstring).

    Args:
        param: the weight ``[m, n]`` (any float dtype; updated in fp32 and rounded once).
        grad: its gradient, same shape (any float dtype).
        proj: ``[r, n]`` for ``side="right"``, ``[m, r]`` for ``side="left"``.
        exp_avg, exp_avg_sq: fp32 moments of the projected gradient's shape.
        step: the step count *including* this update (bias correction).
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"``.
    """
    _check_step_args(param, grad, proj, exp_avg, exp_avg_sq, side, step)
    beta1, beta2 = betas
    if kernel_backend(param, backend) == "triton" and torch.float64 not in (param.dtype, grad.dtype, proj.dtype):
        from vleff.kernels.triton_ops import galore_adam_step_triton

        with torch.no_grad():
            galore_adam_step_triton(
                param, grad, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale
            )
        return
    galore_adam_step_reference(
        param, grad, proj, exp_avg, exp_avg_sq, side, step, lr, beta1, beta2, eps, weight_decay, scale
    )
