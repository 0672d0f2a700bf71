"""ToMe's merge plan: which tokens merge into which, and the plan from each token's best match.

The lowest piece of the merge kernels: the PyTorch references (:mod:`vleff.kernels.tome`), the
Triton launchers (:mod:`vleff.kernels.triton_tome`) and the methods all read a plan the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vleff.kernels.order import stable_argsort


@dataclass(frozen=True)
class MergePlan:
    """Which A tokens merge into which B tokens, for one layer of one batch.

    Attributes:
        src_idx: ``[B, r]`` indices into set A of the merged (source) tokens.
        dst_idx: ``[B, r]`` indices into set B of their destinations.
        unm_idx: ``[B, Na - r]`` indices into set A of the unmerged tokens, ascending.
        num_protected: leading tokens that are never merged.
        num_tokens: tokens before merging.
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    unm_idx: torch.Tensor
    num_protected: int
    num_tokens: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    @property
    def num_out(self) -> int:
        return self.num_tokens - self.r


def _protected_counts(num_protected: int) -> tuple[int, int]:
    """How many protected tokens fall into set A (even positions) and set B (odd)."""
    return (num_protected + 1) // 2, num_protected // 2


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Largest r one bipartite step can merge for a sequence of ``num_tokens`` tokens."""
    a_prot, b_prot = _protected_counts(num_protected)
    a_free = (num_tokens + 1) // 2 - a_prot
    b_free = num_tokens // 2 - b_prot
    if b_free <= 0 or a_free <= 0:
        return 0
    return min(a_free, (num_tokens - num_protected) // 2)


def plan_from_best_match(
    node_max: torch.Tensor, node_idx: torch.Tensor, r: int, num_protected: int, num_tokens: int
) -> MergePlan:
    """Turn each A token's best B match (value and index) into a merge plan for r edges."""
    order = stable_argsort(node_max, descending=True)
    src_idx = order[:, :r]
    unm_idx = order[:, r:].sort(dim=-1).values
    dst_idx = node_idx.gather(dim=-1, index=src_idx)
    return MergePlan(src_idx, dst_idx, unm_idx, num_protected, num_tokens)
