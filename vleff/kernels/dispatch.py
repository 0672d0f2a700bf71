"""Choose between the PyTorch reference and the Triton path for a kernel call.

Rule: ``backend`` argument > ``VLEFF_KERNELS`` environment variable > automatic.
Automatic picks Triton for CUDA tensors when Triton imports (and ``TRITON_INTERPRET`` is not
``1``), the reference otherwise, except for the kernels in :data:`AUTO_ON_CUDA`, whose Triton
version was measured slower than the reference on a GPU (the reference is then a cuBLAS call). Forcing ``"triton"``
on CPU tensors is allowed (it is how the
kernels are tested under ``TRITON_INTERPRET=1``).

Which backend ran and why is logged once per process and decision (logger
``vleff.kernels.dispatch``, level INFO), e.g. ``vleff kernels: backend 'torch' (auto: tensors on
cpu, not CUDA)``; :func:`auto_backend` returns the same decision and reason without logging.
When Triton does not import, :func:`triton_unavailable_reason` says why.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]
_ALLOWED = ("auto", "torch", "triton")
ENV_VAR = "VLEFF_KERNELS"

logger = logging.getLogger(__name__)

_triton_importable: bool | None = None  # decided on first use
_triton_reason: str | None = None  # why Triton is not importable (None while it is, or undecided)
#: failures that mean "Triton cannot be used on this platform" (not installed, a broken or
#: missing shared library); anything else is a bug and propagates
_IMPORT_FAILURES = (ImportError, OSError)
_logged: set[tuple[str, str]] = set()  # (backend, reason) decisions already logged

#: kernel name -> (backend ``auto`` picks for CUDA tensors, why): the measured exceptions to
#: "Triton on CUDA". ``galore_project_back`` is a plain ``[.., r] @ [r, ..]`` product, which cuBLAS
#: runs faster: the Triton kernel took 0.70x the reference's speed on an NVIDIA H200 (4096x4096,
#: rank 256, bf16; ``docs/data/gpu/2026-12-04.md``).
AUTO_ON_CUDA: dict[str, tuple[Backend, str]] = {
    "galore_project_back": ("torch", "auto: cuBLAS back-projection measured faster than Triton (H200)"),
}


def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency).

    Only import-like failures (``ImportError``, ``OSError`` from loading its libraries) count as
    "not available"; their message is kept for :func:`triton_unavailable_reason`. Cached in a
    module global rather than with ``functools.lru_cache``: ``torch.compile`` traces through a
    plain global read, while it warns about (and ignores) an lru_cache.
    """
    global _triton_importable, _triton_reason
    if _triton_importable is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except _IMPORT_FAILURES as exc:  # depends on the platform
            _triton_importable = False
            _triton_reason = f"{type(exc).__name__}: {exc}"
        else:
            _triton_importable = True
            _triton_reason = None
    return _triton_importable


def triton_unavailable_reason() -> str | None:
    """Why Triton is not importable here (the import error), or ``None`` when it is."""
    triton_available()
    return _triton_reason


def _resolve(tensor: torch.Tensor, backend: str | None, kernel: str | None = None) -> tuple[Backend, str]:
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if choice not in _ALLOWED:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={choice!r} is not a kernel backend; allowed: {', '.join(_ALLOWED)}")
    source = "backend argument" if backend is not None else f"{ENV_VAR}={choice}"
    if choice == "torch":
        return "torch", f"forced by {source}"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{ENV_VAR}/backend asks for 'triton' but Triton is not importable here ({_triton_reason})"
            )
        return "triton", f"forced by {source}"
    if not tensor.is_cuda:
        return "torch", f"auto: tensors on {tensor.device.type}, not CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "torch", "auto: TRITON_INTERPRET=1 (the interpreter runs only when forced)"
    if not triton_available():
        return "torch", f"auto: Triton is not importable ({_triton_reason})"
    if kernel in AUTO_ON_CUDA:
        return AUTO_ON_CUDA[kernel]
    return "triton", "auto: CUDA tensors and Triton imports"


def auto_backend(tensor: torch.Tensor, kernel: str | None = None) -> tuple[Backend, str]:
    """``(backend, reason)`` that ``backend="auto"`` picks for ``tensor`` (nothing logged)."""
    return _resolve(tensor, "auto", kernel)


def kernel_backend(tensor: torch.Tensor, backend: str | None = None, kernel: str | None = None) -> Backend:
    """Resolve which implementation handles ``tensor``.

    Args:
        tensor: an input of the op (its device decides the automatic choice).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``; ``None`` reads ``VLEFF_KERNELS``.
        kernel: the kernel's name, for the measured exceptions in :data:`AUTO_ON_CUDA`.
    """
    chosen, reason = _resolve(tensor, backend, kernel)
    if not torch.compiler.is_compiling() and (chosen, reason) not in _logged:
        _logged.add((chosen, reason))
        logger.info("vleff kernels: backend %r (%s)", chosen, reason)
    return chosen
