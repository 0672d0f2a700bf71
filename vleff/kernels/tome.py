"""Bipartite soft matching and size-weighted merging (ToMe, Bolya et al., ICLR 2023).

Written from the paper's description:

* tokens are split alternately into set A (even positions) and set B (odd positions);
* the similarity of an A token to a B token is the cosine similarity of their metrics
  (ToMe uses the keys averaged over heads);
* every A token proposes its most similar B token; the ``r`` proposals with the highest
  similarity are merged (A token = *source*, B token = *destination*);
* a merge is a size-weighted average, and sizes add.

The first ``num_protected`` tokens (cls, distillation and register tokens) take part in
the alternate split as in the paper, but a protected A token is never a source and a
protected B token is never a destination, so they pass through unchanged. Unlike the
reference implementation, the output keeps **all protected tokens first, in their
original order** (cls at 0, DeiT's distillation token at 1), then the unmerged A tokens
in their original order, then the B tokens. Heads that read fixed positions keep working.
With ``r = 0`` nothing changes, not even the order.

A :class:`MergePlan` is computed once per layer and then applied to any per-token tensor
(features, sizes, source maps), so all of them stay aligned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vleff.kernels.dispatch import kernel_backend
from vleff.kernels.plan import (  # noqa: F401 (re-exported)
    MergePlan,
    _protected_counts,
    max_merge,
    plan_from_best_match,
)

#: added to the scores of edges inside a non-zero merge group (padding): cosine similarities
#: lie in [-1, 1], so every real-token edge outranks every padding edge
GROUP_PENALTY = 4.0


def similarity_scores(
    metric: torch.Tensor, num_protected: int, protected: torch.Tensor | None = None, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Cosine similarity of A tokens (rows) to B tokens (columns), protected pairs at -inf.

    ``protected`` (``[B, N]`` bool) protects tokens anywhere in the sequence (a text tower's
    EOT); ``groups`` (``[B, N]`` ints) lets tokens merge only within their group, and edges in
    groups other than 0 (padding) rank below every edge of group 0, so padding only merges
    with padding and never takes a merge away from real tokens.
    """
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    a_prot, b_prot = _protected_counts(num_protected)
    if a_prot:
        scores[:, :a_prot, :] = -torch.inf
    if b_prot:
        scores[:, :, :b_prot] = -torch.inf
    if protected is not None:
        pa, pb = protected[:, ::2].bool(), protected[:, 1::2].bool()
        scores = scores.masked_fill(pa[:, :, None] | pb[:, None, :], -torch.inf)
    if groups is not None:
        ga, gb = groups[:, ::2], groups[:, 1::2]
        scores = scores.masked_fill(ga[:, :, None] != gb[:, None, :], -torch.inf)
        scores = torch.where(ga[:, :, None] != 0, scores - GROUP_PENALTY, scores)
    return scores


def bipartite_soft_matching_reference(
    metric: torch.Tensor,
    r: int,
    num_protected: int = 1,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    source_penalty: torch.Tensor | None = None,
) -> MergePlan:
    """PyTorch reference for :func:`bipartite_soft_matching` (materialises the score matrix)."""
    num_tokens = metric.shape[1]
    r = min(r, max_merge(num_tokens, num_protected))
    scores = similarity_scores(metric, num_protected, protected, groups)
    node_max, node_idx = scores.max(dim=-1)
    if source_penalty is not None:  # a per-source term: which sources merge, not where each goes
        node_max = node_max - source_penalty[:, ::2].to(node_max.dtype)
    if protected is not None or groups is not None:  # never merge along a forbidden (-inf) edge
        r = min(r, int(torch.isfinite(node_max).sum(dim=-1).min()))
    return plan_from_best_match(node_max, node_idx, r, num_protected, num_tokens)


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_protected: int = 1,
    backend: str | None = None,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    source_penalty: torch.Tensor | None = None,
) -> MergePlan:
    """Plan the merge of ``r`` token pairs by bipartite soft matching.

    Args:
        metric: ``[B, N, C]`` per-token features to compare (ToMe: keys averaged over heads).
        r: number of tokens to remove; capped at :func:`max_merge`.
        num_protected: leading tokens that are never merged.
        backend: ``"torch"``, ``"triton"`` or ``None``/``"auto"`` (see :mod:`vleff.kernels.dispatch`).
        protected, groups: see :func:`similarity_scores` (text towers); with either, the
            PyTorch path runs (the Triton kernel handles leading protected tokens only).
        source_penalty: ``[B, N]`` subtracted from each source token's best similarity before the
            ``r`` edges are ranked (Turbo's semantic value): it changes *which* tokens merge, not
            the destination each merges into. PyTorch path.
    """
    if r < 0:
        raise ValueError(f"r={r} must be >= 0")
    if num_protected < 0:
        raise ValueError(f"num_protected={num_protected} must be >= 0")
    with torch.no_grad():
        if protected is not None or groups is not None or source_penalty is not None:
            return bipartite_soft_matching_reference(metric, r, num_protected, protected, groups, source_penalty)
        if kernel_backend(metric, backend) == "triton":
            from vleff.kernels import triton_ops

            return triton_ops.bipartite_soft_matching_triton(metric, r, num_protected)
        return bipartite_soft_matching_reference(metric, r, num_protected)


def _gather_rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(dim=1, index=idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def merge_sum_reference(t: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Sum each merged group of ``t`` (``[B, N, C]``) into one token; output ``[B, N - r, C]``."""
    p = plan.num_protected
    a_prot, b_prot = _protected_counts(p)
    ta, tb = t[:, ::2], t[:, 1::2]
    src = _gather_rows(ta, plan.src_idx)
    unm = _gather_rows(ta, plan.unm_idx)
    dst = tb.scatter_add(1, plan.dst_idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]), src)
    return torch.cat([t[:, :p], unm[:, a_prot:], dst[:, b_prot:]], dim=1)


def merge_sum(t: torch.Tensor, plan: MergePlan, backend: str | None = None) -> torch.Tensor:
    """Sum-merge any per-token tensor (sizes, source maps) along a plan."""
    if not isinstance(plan, MergePlan):  # another plan kind (CrossGET's complete graph) merges itself
        return plan.merge_sum(t)
    if plan.r == 0:
        return t
    if kernel_backend(t, backend) == "triton":
        from vleff.kernels import triton_ops

        return triton_ops.merge_sum_triton(t, plan)
    return merge_sum_reference(t, plan)


def merge_weighted_reference(x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge: ``x' = Σ s·x / Σ s`` and ``s' = Σ s`` over each group.

    Tokens that take part in no merge are copied, not recomputed, so they stay bit-exact.
    """
    a_prot, b_prot = _protected_counts(plan.num_protected)
    p = plan.num_protected
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    dst_rows = plan.dst_idx.unsqueeze(-1)
    src_size = sa.gather(1, plan.src_idx.unsqueeze(-1))
    dst_size = sb.scatter_add(1, dst_rows, src_size)
    src_sum = _gather_rows(xa * sa.to(x.dtype), plan.src_idx)
    dst_sum = (xb * sb.to(x.dtype)).scatter_add(1, dst_rows.expand(-1, -1, x.shape[-1]), src_sum)
    received = torch.zeros_like(sb, dtype=torch.bool).scatter(1, dst_rows, True)
    dst = torch.where(received, dst_sum / dst_size.to(x.dtype), xb)
    unm = _gather_rows(xa, plan.unm_idx)
    unm_size = sa.gather(1, plan.unm_idx.unsqueeze(-1))
    new_x = torch.cat([x[:, :p], unm[:, a_prot:], dst[:, b_prot:]], dim=1)
    new_size = torch.cat([size[:, :p], unm_size[:, a_prot:], dst_size[:, b_prot:]], dim=1)
    return new_x, new_size


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, plan: MergePlan, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge token features ``x`` (``[B, N, C]``) weighted by ``size`` (``[B, N, 1]``).

    Returns the merged features and sizes (``[B, N - r, C]``, ``[B, N - r, 1]``).
    Differentiable in ``x`` on both backends.
    """
    if not isinstance(plan, MergePlan):
        return plan.merge_weighted(x, size)
    if plan.r == 0:
        return x, size
    if kernel_backend(x, backend) == "triton":
        from vleff.kernels import triton_ops

        return triton_ops.merge_weighted_triton(x, size, plan)
    return merge_weighted_reference(x, size, plan)


def merge_reduce(t: torch.Tensor, plan: MergePlan, reduce: str = "sum") -> torch.Tensor:
    """Combine each merged group of a per-token tensor ``[B, N, ...]`` with ``reduce``
    (``"sum"``, ``"max"`` or ``"min"``): what token fields (sizes, source maps, flags, first
    positions) hold after a merge. Output ``[B, N - r, ...]`` in the plan's token order.

    ``plan`` is a :class:`MergePlan` or any object with the same ``r`` / ``num_out`` /
    ``num_tokens`` / ``src_idx`` attributes and ``merge_sum`` / ``merge_weighted`` /
    ``merge_reduce`` methods (:class:`vleff.kernels.graph_merge.GraphMergePlan`), which then
    merges itself here and in :func:`merge_sum` / :func:`merge_weighted`."""
    if not isinstance(plan, MergePlan):
        return plan.merge_reduce(t, reduce)
    if plan.r == 0:
        return t
    shape = t.shape
    flat = t.reshape(shape[0], shape[1], -1)
    if reduce == "sum":
        out = merge_sum(flat, plan)
    elif reduce in ("max", "min"):
        p = plan.num_protected
        a_prot, b_prot = _protected_counts(p)
        ta, tb = flat[:, ::2], flat[:, 1::2]
        src = _gather_rows(ta, plan.src_idx)
        unm = _gather_rows(ta, plan.unm_idx)
        index = plan.dst_idx.unsqueeze(-1).expand(-1, -1, flat.shape[-1])
        dst = tb.scatter_reduce(1, index, src, reduce="amax" if reduce == "max" else "amin", include_self=True)
        out = torch.cat([flat[:, :p], unm[:, a_prot:], dst[:, b_prot:]], dim=1)
    else:
        raise ValueError(f"reduce={reduce!r} must be 'sum', 'max' or 'min'")
    return out.reshape(shape[0], out.shape[1], *shape[2:])
