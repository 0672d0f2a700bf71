"""Triton kernels for GaLore's low-rank projection, back-projection and a fused Adam step.

One tiled matmul kernel (fp32 accumulation, grouped program order for L2 reuse) serves all
four products; transposes are expressed through strides, so ``projᵀ`` is never copied.
Three epilogues:

* ``EPI_STORE``: write the product (``project`` / ``project_back``).
* ``EPI_ADAM``: the product is the projected gradient ``R``; update the Adam moments in
  place and write the normalised low-rank update ``(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)``
  (torch ``AdamW``'s formula, applied in the rank-r space).
* ``EPI_UPDATE``: the product is the back-projected update ``U``; apply
  ``W <- W (1 - lr·wd) - lr·scale·U`` to the weight in place, so the full-size ``U`` is
  never written to memory (the reference materialises it, then reads it again).

Mixed input dtypes (a bf16 gradient with an fp32 projection, the usual GaLore case) are
cast to fp32 in registers instead of materialising ``grad.float()``. fp32 products use
``tf32x3`` on GPUs unless torch itself is allowed TF32 (see
:func:`vleff.kernels.triton_tome.fp32_dot_precision`). fp64 inputs go to the PyTorch
reference (tensor-core matmuls have no fp64 path worth having here).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vleff.kernels.lowrank_reference import (
    _check_side,
)
from vleff.kernels.triton_tome import fp32_dot_precision

EPI_STORE, EPI_ADAM, EPI_UPDATE = 0, 1, 2


@triton.jit
def _mm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    m_ptr,
    v_ptr,
    M,
    N,
    K,
    sam,
    sak,
    sbk,
    sbn,
    scm,
    scn,
    smm,
    smn,
    beta1,
    beta2,
    bc1,
    bc2_sqrt,
    eps,
    decay,
    step_scale,
    EPI: tl.constexpr,
    UPCAST: tl.constexpr,
    F32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    a_rows = a_ptr + rm[:, None].to(tl.int64) * sam
    b_cols = b_ptr + rn[None, :].to(tl.int64) * sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        a = tl.load(a_rows + rk[None, :].to(tl.int64) * sak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + rk[:, None].to(tl.int64) * sbk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=F32_PREC)
        elif a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=F32_PREC)
        else:
            acc = tl.dot(a, b, acc)

    mask = m_ok[:, None] & n_ok[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * scm + rn[None, :] * scn
    if EPI == 0:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    elif EPI == 1:
        mv_off = rm[:, None].to(tl.int64) * smm + rn[None, :] * smn
        m = tl.load(m_ptr + mv_off, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + mv_off, mask=mask, other=0.0).to(tl.float32)
        m = beta1 * m + (1.0 - beta1) * acc
        v = beta2 * v + (1.0 - beta2) * acc * acc
        tl.store(m_ptr + mv_off, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + mv_off, v.to(v_ptr.dtype.element_ty), mask=mask)
        upd = (m / bc1) / (tl.sqrt(v) / bc2_sqrt + eps)
        tl.store(c_ptrs, upd.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        w = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
        w = w * decay - step_scale * acc
        tl.store(c_ptrs, w.to(c_ptr.dtype.element_ty), mask=mask)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (32, 64, 128, 4, 4),
        (64, 32, 128, 4, 4),
        (128, 128, 64, 8, 3),
    ]
]
# In-place epilogues must not leak the tuning runs' writes: restore the mutated buffers.
_mm_kernel_tuned = triton.autotune(
    configs=_GPU_CONFIGS,
    key=["M", "N", "K", "EPI", "UPCAST"],
    restore_value=["c_ptr", "m_ptr", "v_ptr"],
)(_mm_kernel)


def _matmul(
    a: torch.Tensor,
    a_strides: tuple[int, int],
    b: torch.Tensor,
    b_strides: tuple[int, int],
    c: torch.Tensor,
    c_strides: tuple[int, int],
    m: int,
    n: int,
    k: int,
    epi: int = EPI_STORE,
    moments: tuple[torch.Tensor, torch.Tensor] | None = None,
    coeffs: tuple[float, ...] = (0.0,) * 7,
) -> None:
    """Launch ``c[m, n] (op)= a[m, k] @ b[k, n]`` with the given element strides."""
    if m == 0 or n == 0:
        return
    on_gpu = c.is_cuda
    upcast = (a.dtype != b.dtype) or (not on_gpu and a.dtype != torch.float32)
    mom_m, mom_v = moments if moments is not None else (c, c)
    args = (
        a,
        b,
        c,
        mom_m,
        mom_v,
        m,
        n,
        k,
        *a_strides,
        *b_strides,
        *c_strides,
        mom_m.stride(0),
        mom_m.stride(1),
        *coeffs,
    )
    consts = dict(EPI=epi, UPCAST=upcast, F32_PREC=fp32_dot_precision(c.device))
    if on_gpu:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _mm_kernel_tuned[grid](*args, **consts)
    else:  # interpreter: one small config (>= 16 for tl.dot), many tiles exercise the masks
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 16),)
        _mm_kernel[grid](*args, **consts, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1)


def _check_pair(name: str, full: torch.Tensor, proj: torch.Tensor, side: str, low_rank: bool) -> None:
    _check_side(side)
    for what, t in ((name, full), ("proj", proj)):
        if t.dim() != 2:
            raise ValueError(f"{what} must be a 2-D matrix; got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what} must be floating point; got dtype {t.dtype}")
    # the dimension of `full` that proj contracts with
    if low_rank:  # full is [m, r] (right) or [r, n] (left)
        ok = full.shape[1] == proj.shape[0] if side == "right" else full.shape[0] == proj.shape[1]
    else:  # full is [m, n]
        ok = full.shape[1] == proj.shape[1] if side == "right" else full.shape[0] == proj.shape[0]
    if not ok:
        raise ValueError(
            f"{name} shape {tuple(full.shape)} does not fit proj shape {tuple(proj.shape)} for side={side!r}"
        )
    if full.device != proj.device:
        raise ValueError(f"{name} is on {full.device} but proj is on {proj.device}")


def _operands_project(grad: torch.Tensor, proj: torch.Tensor, side: str):
    """(a, a_strides, b, b_strides, M, N, K) for R = G Pᵀ (right) or R = Pᵀ G (left)."""
    if side == "right":  # [m, n] @ [n, r]
        return grad, grad.stride(), proj, (proj.stride(1), proj.stride(0)), grad.shape[0], proj.shape[0], grad.shape[1]
    # [r, m] @ [m, n]
    return proj, (proj.stride(1), proj.stride(0)), grad, grad.stride(), proj.shape[1], grad.shape[1], grad.shape[0]


def _operands_back(low: torch.Tensor, proj: torch.Tensor, side: str):
    """(a, a_strides, b, b_strides, M, N, K) for U = R P (right) or U = P R (left)."""
    if side == "right":  # [m, r] @ [r, n]
        return low, low.stride(), proj, proj.stride(), low.shape[0], proj.shape[1], low.shape[1]
    # [m, r] @ [r, n]
    return proj, proj.stride(), low, low.stride(), proj.shape[0], low.shape[1], proj.shape[1]


def project_launch(grad: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """Kernel launch behind ``torch.ops.vleff.lowrank_project``."""
    a, sa, b, sb, m, n, k = _operands_project(grad, proj, side)
    out = torch.empty(m, n, device=grad.device, dtype=torch.promote_types(grad.dtype, proj.dtype))
    _matmul(a, sa, b, sb, out, out.stride(), m, n, k)
    return out


def project_back_launch(low_rank: torch.Tensor, proj: torch.Tensor, side: str) -> torch.Tensor:
    """Kernel launch behind ``torch.ops.vleff.lowrank_project_back``."""
    a, sa, b, sb, m, n, k = _operands_back(low_rank, proj, side)
    out = torch.empty(m, n, device=low_rank.device, dtype=torch.promote_types(low_rank.dtype, proj.dtype))
    _matmul(a, sa, b, sb, out, out.stride(), m, n, k)
    return out


def galore_adam_step_launch(
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
    """Two kernels: projection with the Adam-moment epilogue, back-projection with the weight update."""
    a, sa, b, sb, m, n, k = _operands_project(grad, proj, side)
    norm = torch.empty(m, n, device=grad.device, dtype=torch.float32)
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    coeffs = (beta1, beta2, bc1, bc2_sqrt, eps, 1.0 - lr * weight_decay, lr * scale)
    _matmul(a, sa, b, sb, norm, norm.stride(), m, n, k, epi=EPI_ADAM, moments=(exp_avg, exp_avg_sq), coeffs=coeffs)
    a, sa, b, sb, m, n, k = _operands_back(norm, proj, side)
    _matmul(a, sa, b, sb, param, param.stride(), m, n, k, epi=EPI_UPDATE, coeffs=coeffs)
