"""Memory measurements that do not depend on allocator noise where that is possible.

* :func:`saved_activation_bytes` — bytes of the tensors autograd saves for backward during a
  call, via :class:`torch.autograd.graph.saved_tensors_hooks`. Deterministic and identical on
  CPU and GPU, which makes it the right number for "activation memory" comparisons
  (reversible blocks, side networks, token merging all change exactly this).
* :func:`optimizer_state_bytes` — bytes of ``optimizer.state`` (Adam moments, GaLore's
  low-rank moments and projectors ...).
* :func:`peak_memory_bytes` — what the allocator actually reached: the CUDA caching
  allocator's peak on GPU; on CPU the growth of the process's peak resident set size, which
  is noisy (see its docstring) and only a rough check.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "plain_tensors",
    "saved_activation_bytes",
    "tensor_storage_bytes",
]


def plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s memory: ``t`` itself, or for a wrapper tensor subclass
    (torchao's ``NF4Tensor``: QLoRA's 4-bit weights) the inner tensors it flattens to — a wrapper
    has no storage of its own (asking for its data pointer raises)."""
    if type(t) is not torch.Tensor and not isinstance(t, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [p for name in names for p in plain_tensors(getattr(t, name))]
    return [t]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr())


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``linear`` saves ``weight.t()``, a view of the weight)."""
    if isinstance(t, nn.Parameter):
        return True
    base = getattr(t, "_base", None)
    return isinstance(base, nn.Parameter)


def saved_activation_bytes(
    fn: Callable[[], Any],
    *,
    include_parameters: bool = False,
    exclude: nn.Module | Iterable[torch.Tensor] | None = None,
) -> int:
    """Bytes of the tensors saved for backward while ``fn()`` runs (grad must be enabled).

    Each underlying storage is counted once, at its full size: ``q``, ``k`` and ``v`` split
    from one ``qkv`` output, or a ReLU output saved by both the ReLU and the next Linear,
    keep one buffer alive, not three. Parameters (and views of them) are left out by default:
    they live in memory whether or not anything is saved. ``exclude`` leaves out further
    tensors (or all parameters and buffers of a module, e.g. frozen weights that are plain
    tensors). The graph ``fn`` builds is dropped afterwards; nothing runs backward.
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("saved_activation_bytes needs grad enabled; it measured inside torch.no_grad()")
    excluded: set[tuple[str, int]] = set()
    if isinstance(exclude, nn.Module):
        exclude = [*exclude.parameters(), *exclude.buffers()]
    for t in exclude or ():
        excluded.update(_storage_key(p) for p in plain_tensors(t))
    seen: dict[tuple[str, int], torch.UntypedStorage] = {}  # holds storages so pointers stay unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        if include_parameters or not _is_parameter(t):
            for p in plain_tensors(t):
                key = _storage_key(p)
                if key not in excluded and key not in seen:
                    seen[key] = p.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return int(sum(s.nbytes() for s in seen.values()))


def tensor_storage_bytes(obj: Any) -> int:
    """Bytes of every tensor reachable from ``obj`` through dicts, lists, tuples, sets and
    plain objects' attributes, each storage counted once (GaLore keeps projector objects)."""
    seen_storages: set[tuple[str, int]] = set()
    seen_objects: set[int] = set()
    total = 0

    def visit(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            for p in plain_tensors(x):
                key = _storage_key(p)
                if key not in seen_storages:
                    seen_storages.add(key)
                    total += p.untyped_storage().nbytes()
            return
        if id(x) in seen_objects or isinstance(x, (str, bytes, int, float, bool, type(None))):
            return
        seen_objects.add(id(x))
        if isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple, set, frozenset)):
            for v in x:
                visit(v)
        elif hasattr(x, "__dict__") and not isinstance(x, (nn.Module, type)):
            for v in vars(x).values():
                visit(v)

    visit(obj)
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (moments, step counters, projectors), storages once.

    The state is created lazily: measure after at least one ``optimizer.step()``.
    """
    state = getattr(optimizer, "state", None)
    if state is None:
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (with .state), got {type(optimizer).__name__}")
    return tensor_storage_bytes(list(state.values()))


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset Linux's per-process RSS high-water mark (``VmHWM``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_growth(fn: Callable[[], Any]) -> int:
    rss_before = _proc_status_kib("VmRSS")
    if rss_before is not None and _reset_peak_rss():
        out = fn()
        peak = _proc_status_kib("VmHWM") or rss_before
        del out
        return max(0, peak - rss_before) * 1024
    # Fallback (macOS, restricted /proc): ru_maxrss is a lifetime peak and cannot be reset, so
    # only growth beyond every earlier peak is seen.
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return max(0, after - before) * scale


def peak_memory_bytes(fn: Callable[[], Any], device: str | torch.device | None = None) -> int:
    """Peak memory ``fn()`` needed above what was allocated when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
    ``memory_allocated`` before the call — exact for tensors, excludes the allocator's cache.

    CPU: growth of the process's peak resident set size (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``). Caveats: RSS counts pages, not tensors — the allocator may
    reuse memory freed earlier (under-count) or keep freed memory mapped, other threads and
    Python objects count too, and without a resettable high-water mark (non-Linux) only growth
    beyond the process's earlier peak is seen. Use :func:`saved_activation_bytes` to compare
    methods; this is a sanity check.

    ``device=None`` means CUDA when it is available, else CPU.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del out
        return max(0, peak - before)
    if dev.type == "cpu":
        return _cpu_peak_growth(fn)
    raise ValueError(f"device={str(dev)!r} is not supported by peak_memory_bytes; use 'cpu' or 'cuda'")
