"""Triton kernels for ToMe's bipartite soft matching and size-weighted merge.

The PyTorch reference (:mod:`vleff.kernels.tome`) is the contract; these kernels return the
same :class:`~vleff.kernels.tome.MergePlan` and the same merged tensors.

**Matching** (:func:`bipartite_soft_matching_triton`). One program owns ``BLOCK_M`` rows of
set A (even tokens) of one batch element and walks over set B (odd tokens) in tiles of
``BLOCK_N``: it accumulates the raw dot products ``a·b`` over the channels (``tl.dot``,
fp32 accumulation), the squared norms of its A and B rows, scales the tile to cosine
similarity and keeps a running row-wise max/argmax. The ``Na × Nb`` score matrix therefore
never reaches memory. Protected A rows and B columns get ``-inf`` exactly as
``similarity_scores`` does. Only ``[B, Na]`` maxima and indices are written; the top-r
selection reuses :func:`~vleff.kernels.tome.plan_from_best_match` (an argsort of ``[B, Na]``).

Numerics: the reference normalises in fp32 and then multiplies; the kernel multiplies the
raw inputs and divides by the fp32 norms afterwards. Products of fp16/bf16 values are exact
in fp32, so both agree to fp32 rounding (~1e-7 relative). For fp32 inputs on a GPU the dot
uses TF32 only when ``torch.get_float32_matmul_precision()`` allows it for torch as well.

Tie-breaking: ``torch.max(dim=...)`` returns the *first* (lowest) index among equal maxima;
the kernel matches it (``tie_break_left`` inside a tile, strict ``>`` across tiles, so the
earlier tile wins). A fully ``-inf`` row (protected) gets index 0 like ``torch.max``. Exact
ties reproduce; near-ties closer than fp32 rounding may pick the other index (the two scores
are then equal to ~1e-7, so the merge is equally good).

**Merge** (:func:`merge_sum_triton`, :func:`merge_weighted_triton`). The plan is turned
into a gather map (:class:`MergeIndex`): for every *output* row, the input token that seeds
it and a segment of source tokens (A tokens merged into that B destination) in a list sorted
by destination (stable argsort + cumsum of counts). One program owns one output row (and a
block of channels), loops over its sources and writes the row once: accumulation is in
fp32, **deterministic** (fixed order, no atomics) and the unmerged tokens are gathered in
the same pass. Backward is a pure gather too: every input token belongs to exactly one
output row (``MergeIndex.out_row``), so ``dx_i = dy[out_row[i]] · s_i / S[out_row[i]]``,
again without atomics.

Output layout (as ``merge_sum_reference``): protected tokens in their original order,
then the unmerged A tokens (ascending), then the B tokens (minus protected ones).

The ops are registered as ``torch.library`` custom ops in :mod:`vleff.kernels.custom_ops`
(autograd, fake tensors for ``torch.compile``, FLOP formulas in :mod:`vleff.kernels.flops`);
this module holds the kernels and their launchers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vleff.kernels.plan import (
    MergePlan,
    _protected_counts,
)

# --------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------


@triton.jit
def _best_match_kernel(
    m_ptr,
    max_ptr,
    idx_ptr,
    Na,
    Nb,
    C,
    a_prot,
    b_prot,
    stride_b,
    stride_n,
    stride_c,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    F32_PREC: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    base = m_ptr + pid_b.to(tl.int64) * stride_b
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Na
    a_rows = base + (2 * rows)[:, None].to(tl.int64) * stride_n

    # squared norms of this program's A rows
    a_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks[None, :] * stride_c, mask=row_ok[:, None] & (ks < C)[None, :], other=0.0)
        a = a.to(tl.float32)
        a_sq += tl.sum(a * a, axis=1)
    a_norm = tl.maximum(tl.sqrt(a_sq), 1e-12)  # F.normalize's eps

    best = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_M], dtype=tl.int32)
    for n0 in range(0, Nb, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < Nb
        b_cols = base + (2 * cols + 1)[None, :].to(tl.int64) * stride_n
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        b_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < C
            a = tl.load(a_rows + ks[None, :] * stride_c, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_cols + ks[:, None] * stride_c, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_UPCAST:  # interpreter: numpy has no bf16 matmul; fp32 products are equal
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif a.dtype == tl.float32:
                acc = tl.dot(a, b, acc, input_precision=F32_PREC)
            else:
                acc = tl.dot(a, b, acc)  # fp16/bf16 products are exact in the fp32 accumulator
            bf = b.to(tl.float32)
            b_sq += tl.sum(bf * bf, axis=0)
        b_norm = tl.maximum(tl.sqrt(b_sq), 1e-12)
        # divide by the product of norms (not multiply by reciprocals): parallel vectors then
        # score exactly +-1 and duplicated tokens tie exactly, as after F.normalize
        s = acc / (a_norm[:, None] * b_norm[None, :])
        s = tl.where((col_ok & (cols >= b_prot))[None, :], s, float("-inf"))
        tile_max, tile_idx = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_max > best  # strict: an earlier tile wins ties, like torch.max
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx + n0, best_idx)

    protected = rows < a_prot
    best = tl.where(protected, float("-inf"), best)
    best_idx = tl.where(protected, 0, best_idx)
    out = pid_b.to(tl.int64) * Na + rows
    tl.store(max_ptr + out, best, mask=row_ok)
    tl.store(idx_ptr + out, best_idx.to(tl.int64), mask=row_ok)


def fp32_dot_precision(device: torch.device) -> str:
    """``input_precision`` for fp32 ``tl.dot``: follow torch's own fp32 matmul setting.

    ``torch.get_float32_matmul_precision() == "highest"`` (torch's default, no TF32) maps to
    ``"tf32x3"`` (three TF32 products, ~fp32 accuracy on tensor cores) on GPUs; when torch is
    allowed TF32, so are the kernels. The CPU interpreter computes in numpy fp32 anyway.
    """
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, triton.next_power_of_2(max(int(n), 1)))


def _match_blocks(na: int, nb: int, c: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps). The interpreter prefers few, small programs."""
    if not on_gpu:
        return 16, 16, min(_pow2_at_least(c, 16), 32), 1
    return 64, 64, min(_pow2_at_least(c, 16), 64), 4


def best_match_launch(
    metric: torch.Tensor, num_protected: int, blocks: tuple[int, int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best cosine similarity to a B token and that B token's index.

    Equals ``similarity_scores(metric, num_protected).max(dim=-1)`` (values to fp32
    rounding) without materialising the scores. ``blocks`` overrides the tile sizes
    (tests use it to exercise multi-tile rows).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, C]; got shape {tuple(metric.shape)}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be floating point; got dtype {metric.dtype}")
    bsz, n, c = metric.shape
    na, nb = (n + 1) // 2, n // 2
    a_prot, b_prot = _protected_counts(num_protected)
    node_max = torch.empty(bsz, na, device=metric.device, dtype=torch.float32)
    node_idx = torch.empty(bsz, na, device=metric.device, dtype=torch.int64)
    if bsz == 0 or na == 0:
        return node_max, node_idx
    if metric.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        metric = metric.float()  # fp64: matched in fp32, like the reference's .float()
    on_gpu = metric.is_cuda
    bm, bn, bk, warps = _match_blocks(na, nb, c, on_gpu)
    if blocks is not None:
        bm, bn, bk = blocks
    grid = (triton.cdiv(na, bm), bsz)
    _best_match_kernel[grid](
        metric,
        node_max,
        node_idx,
        na,
        nb,
        c,
        a_prot,
        b_prot,
        metric.stride(0),
        metric.stride(1),
        metric.stride(2),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        F32_PREC=fp32_dot_precision(metric.device),
        DOT_UPCAST=not on_gpu,
        num_warps=warps,
    )
    return node_max, node_idx


# --------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeIndex:
    """A :class:`MergePlan` as a gather map (all ``int64``, on the plan's device).

    Attributes:
        base: ``[B, N - r]`` input token that seeds each output row.
        seg_start, seg_end: ``[B, N - r]`` each output row's segment of ``srcs``.
        srcs: ``[B, r]`` source tokens (input positions) sorted by destination.
        out_row: ``[B, N]`` output row each input token ends up in (for the backward).
    """

    base: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    srcs: torch.Tensor
    out_row: torch.Tensor


_INDEX_ATTR = "_vleff_triton_merge_index"


def merge_index(plan: MergePlan) -> MergeIndex:
    """Build (once per plan, cached on it) the gather map the merge kernels read.

    The plan must come from bipartite soft matching: protected tokens are never sources or
    destinations (the reference would drop such merges silently; here they are undefined).
    """
    cached = plan.__dict__.get(_INDEX_ATTR)
    if cached is not None:
        return cached
    src, dst, unm = plan.src_idx, plan.dst_idx, plan.unm_idx
    bsz, r = src.shape
    device = src.device
    n, p = plan.num_tokens, plan.num_protected
    a_prot, b_prot = _protected_counts(p)
    nb = n // 2
    n_out = n - r
    n_unm = unm.shape[1] - a_prot  # unmerged, unprotected A tokens

    order = dst.argsort(dim=1, stable=True)
    srcs = (2 * src.gather(1, order)).contiguous()
    counts = torch.zeros(bsz, nb, dtype=torch.int64, device=device)
    counts.scatter_add_(1, dst, torch.ones_like(dst))
    ends = counts.cumsum(dim=1)
    starts = ends - counts

    base = torch.cat(
        [
            torch.arange(p, device=device).expand(bsz, p),
            2 * unm[:, a_prot:],
            (2 * torch.arange(b_prot, nb, device=device) + 1).expand(bsz, nb - b_prot),
        ],
        dim=1,
    ).contiguous()
    zeros = torch.zeros(bsz, p + n_unm, dtype=torch.int64, device=device)
    seg_start = torch.cat([zeros, starts[:, b_prot:]], dim=1).contiguous()
    seg_end = torch.cat([zeros, ends[:, b_prot:]], dim=1).contiguous()

    out_row = torch.empty(bsz, n, dtype=torch.int64, device=device)
    out_row.scatter_(1, base, torch.arange(n_out, device=device).expand(bsz, n_out))
    out_row.scatter_(1, 2 * src, p + n_unm + (dst - b_prot))

    index = MergeIndex(base, seg_start, seg_end, srcs, out_row)
    object.__setattr__(plan, _INDEX_ATTR, index)  # frozen dataclass: cache beside the fields
    return index


@triton.jit
def _merge_fwd_kernel(
    x_ptr,
    s_ptr,
    out_ptr,
    out_s_ptr,
    base_ptr,
    start_ptr,
    end_ptr,
    srcs_ptr,
    N_out,
    R,
    C,
    sxb,
    sxn,
    sxc,
    ssb,
    ssn,
    WEIGHTED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # b * N_out + j
    pid_c = tl.program_id(1)
    b = row // N_out
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    x_b = x_ptr + b.to(tl.int64) * sxb
    s_b = s_ptr + b.to(tl.int64) * ssb

    tok = tl.load(base_ptr + row)
    acc = tl.load(x_b + tok * sxn + cs * sxc, mask=c_ok, other=0.0).to(tl.float32)
    if WEIGHTED:
        w_sum = tl.load(s_b + tok * ssn).to(tl.float32)
        acc = acc * w_sum
    start = tl.load(start_ptr + row)
    end = tl.load(end_ptr + row)
    for k in range(start, end):
        src = tl.load(srcs_ptr + b.to(tl.int64) * R + k)
        v = tl.load(x_b + src * sxn + cs * sxc, mask=c_ok, other=0.0).to(tl.float32)
        if WEIGHTED:
            w = tl.load(s_b + src * ssn).to(tl.float32)
            acc += v * w
            w_sum += w
        else:
            acc += v
    if WEIGHTED:
        acc = acc / w_sum
        tl.store(out_s_ptr + row, w_sum.to(out_s_ptr.dtype.element_ty), mask=pid_c == 0)
    tl.store(out_ptr + row.to(tl.int64) * C + cs, acc.to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _merge_bwd_kernel(
    g_ptr,
    w_ptr,
    out_ptr,
    row_ptr,
    N,
    N_out,
    C,
    sgb,
    sgn,
    sgc,
    WEIGHTED: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tok = tl.program_id(0)  # b * N + i
    pid_c = tl.program_id(1)
    b = tok // N
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cs < C
    j = tl.load(row_ptr + tok)
    g = tl.load(g_ptr + b.to(tl.int64) * sgb + j * sgn + cs * sgc, mask=c_ok, other=0.0).to(tl.float32)
    if WEIGHTED:
        g = g * tl.load(w_ptr + tok).to(tl.float32)
    tl.store(out_ptr + tok.to(tl.int64) * C + cs, g.to(out_ptr.dtype.element_ty), mask=c_ok)


def _block_c(c: int, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_C, num_warps) for the row kernels: whole rows up to 1024 channels per program."""
    block = min(_pow2_at_least(c, 16), 1024 if on_gpu else 64)
    return block, (4 if block >= 512 else 2 if block >= 128 else 1)


def _check_merge_input(name: str, t: torch.Tensor, index: MergeIndex) -> None:
    if t.dim() != 3 or t.shape[:2] != index.out_row.shape:
        raise ValueError(
            f"{name} must be [B, N, C] with [B, N] = {tuple(index.out_row.shape)} from the plan; "
            f"got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise ValueError(
            f"{name} must be floating point for the Triton merge; got dtype {t.dtype} "
            "(use backend='torch' for integer tensors)"
        )


def merge_fwd_launch(
    x: torch.Tensor,
    size: torch.Tensor | None,
    base: torch.Tensor,
    seg_start: torch.Tensor,
    seg_end: torch.Tensor,
    srcs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Merged ``x`` (sum, or size-weighted mean when ``size`` is given) and merged sizes."""
    bsz, _, c = x.shape
    n_out = base.shape[1]
    out = torch.empty(bsz, n_out, c, device=x.device, dtype=x.dtype)
    out_s = None
    if size is not None:
        out_s = torch.empty(bsz, n_out, 1, device=size.device, dtype=size.dtype)
    if out.numel() == 0:
        return out, out_s
    block, warps = _block_c(c, x.is_cuda)
    grid = (bsz * n_out, triton.cdiv(c, block))
    s = size if size is not None else x  # dummy pointer when unweighted
    _merge_fwd_kernel[grid](
        x,
        s,
        out,
        out_s if out_s is not None else out,
        base,
        seg_start,
        seg_end,
        srcs,
        n_out,
        srcs.shape[1],
        c,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        s.stride(0),
        s.stride(1),
        WEIGHTED=size is not None,
        BLOCK_C=block,
        num_warps=warps,
    )
    return out, out_s


def merge_bwd_launch(
    grad_out: torch.Tensor, out_row: torch.Tensor, weight: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """Gradient w.r.t. the merged input: ``grad_in[i] = grad_out[out_row[i]] * weight[i]``."""
    bsz, n_out, c = grad_out.shape
    n = out_row.shape[1]
    grad_in = torch.empty(bsz, n, c, device=grad_out.device, dtype=dtype)
    if grad_in.numel() == 0:
        return grad_in
    block, warps = _block_c(c, grad_out.is_cuda)
    w = weight.contiguous() if weight is not None else out_row
    _merge_bwd_kernel[(bsz * n, triton.cdiv(c, block))](
        grad_out,
        w,
        grad_in,
        out_row,
        n,
        n_out,
        c,
        grad_out.stride(0),
        grad_out.stride(1),
        grad_out.stride(2),
        WEIGHTED=weight is not None,
        BLOCK_C=block,
        num_warps=warps,
    )
    return grad_in
