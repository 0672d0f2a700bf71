"""GaLore's low-rank projections in plain PyTorch: the ground truth the Triton kernels are tested
against, below both the dispatching functions (:mod:`vleff.kernels.lowrank`) and the launchers."""

from __future__ import annotations

from typing import Literal

import torch

Side = Literal["left", "right"]


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not allowed; use 'left' or 'right'")


def project_reference(grad: torch.Tensor, proj: torch.Tensor, side: Side) -> torch.Tensor:
    _check_side(side)
    return grad @ proj.T if side == "right" else proj.T @ grad


def project_back_reference(low_rank: torch.Tensor, proj: torch.Tensor, side: Side) -> torch.Tensor:
    _check_side(side)
    return low_rank @ proj if side == "right" else proj @ low_rank
