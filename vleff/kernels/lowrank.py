"""Projection of a gradient into a low-rank space and back (GaLore, Zhao et al., ICML 2024).

For a weight gradient ``G`` of shape ``[m, n]``:

* ``side="right"`` (used when ``m >= n``): ``P`` is ``[r, n]`` (top right singular vectors,
  ``Vh[:r]``); ``R = G Pᵀ`` is ``[m, r]``; back-projection ``R P`` is ``[m, n]``.
* ``side="left"`` (used when ``m < n``): ``P`` is ``[m, r]`` (top left singular vectors,
  ``U[:, :r]``); ``R = Pᵀ G`` is ``[r, n]``; back-projection ``P R`` is ``[m, n]``.

The reference is plain matrix products; the Triton path (``vleff.kernels.triton_lowrank``)
is picked by :func:`vleff.kernels.dispatch.kernel_backend`.
"""

from __future__ import annotations

import torch

from vleff.kernels.dispatch import kernel_backend
from vleff.kernels.lowrank_reference import (  # noqa: F401
    Side,
    _check_side,
    project_back_reference,
    project_reference,
)


def project(grad: torch.Tensor, proj: torch.Tensor, side: Side, backend: str | None = None) -> torch.Tensor:
    """Project ``grad`` into the rank-r space spanned by ``proj``."""
    if kernel_backend(grad, backend) == "triton":
        from vleff.kernels import triton_ops

        return triton_ops.project_triton(grad, proj, side)
    return project_reference(grad, proj, side)


def project_back(low_rank: torch.Tensor, proj: torch.Tensor, side: Side, backend: str | None = None) -> torch.Tensor:
    """Map a rank-r update back to the full weight shape."""
    if kernel_backend(low_rank, backend, kernel="galore_project_back") == "triton":
        from vleff.kernels import triton_ops

        return triton_ops.project_back_triton(low_rank, proj, side)
    return project_back_reference(low_rank, proj, side)
