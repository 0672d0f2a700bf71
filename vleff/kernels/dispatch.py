"""Choose between the PyTorch reference and the Triton path for a kernel call.

Rule: ``backend`` argument > ``VLEFF_KERNELS`` environment variable > automatic.
Automatic picks Triton for CUDA tensors when Triton imports, the reference otherwise.
Forcing ``"triton"`` on CPU tensors is allowed (it is how the kernels are tested under
``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
_ALLOWED = ("auto", "torch", "triton")
ENV_VAR = "VLEFF_KERNELS"


_triton_importable: bool | None = None  # decided on first use


def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency).

    Cached in a module global rather than with ``functools.lru_cache``: ``torch.compile``
    traces through a plain global read, while it warns about (and ignores) an lru_cache.
    """
    global _triton_importable
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_importable = True
        except Exception:  # pragma: no cover - depends on the platform
            _triton_importable = False
    return _triton_importable


def kernel_backend(tensor: torch.Tensor, backend: str | None = None) -> Backend:
    """Resolve which implementation handles ``tensor``.

    Args:
        tensor: an input of the op (its device decides the automatic choice).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; ``None`` reads ``VLEFF_KERNELS``.
    """
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in _ALLOWED:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={choice!r} is not a kernel backend; allowed: {', '.join(_ALLOWED)}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}/backend asks for 'triton' but Triton is not importable here")
        return "triton"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if tensor.is_cuda and not interpreted and triton_available():
        return "triton"
    return "torch"
