"""Tensor operations with a PyTorch reference and (where it pays) a Triton version.

Each op has one public function that dispatches (see :mod:`vleff.kernels.dispatch`);
the ``*_reference`` functions are the ground truth the Triton kernels are tested against.
This layer knows nothing about models or Lightning.
"""

from vleff.kernels.dispatch import kernel_backend
from vleff.kernels.lowrank import project, project_back
from vleff.kernels.tome import (
    MergePlan,
    bipartite_soft_matching,
    merge_sum,
    merge_weighted,
)

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "kernel_backend",
    "merge_sum",
    "merge_weighted",
    "project",
    "project_back",
]
