"""FLOP counting with :class:`torch.utils.flop_counter.FlopCounterMode`, with its gaps fixed.

Why a wrapper and not the bare counter: ``FlopCounterMode`` counts only the ops that have a
formula, and torch 2.14 has none for two ops every vision transformer hits on CPU:

* ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward): every fused
  attention (timm ``fused_attn=True``, ``F.scaled_dot_product_attention``) counts as **0**;
* ``aten._native_multi_head_attention``: ``nn.MultiheadAttention``'s inference fast path
  (eval mode, no grad; open_clip and many CLIPs) counts as **0**, *including its q/k/v and
  output projections* (open_clip ViT-B-32 image tower: 5.89 GFLOPs counted instead of 8.82).

:func:`flop_counter` adds formulas for these ops through ``custom_mapping`` (so torch's global
registry is not mutated and a future torch that registers them itself does not clash) and
turns the MHA fast path off while counting, so ``nn.MultiheadAttention`` runs its composite
path whose linear layers and attention torch counts op by op. The fast-path formula stays
registered as a second line of defence (and is what counts if ``disable_mha_fastpath=False``).

Convention (torch's): a multiply-add is 2 FLOPs; only matmuls, convolutions and attention
are counted (norms, softmax, activations, bias adds are not). Attention counts
``4·B·H·Nq·Nk·Dh`` forward (q·kᵀ and p·v) whatever the mask, an upper bound for causal
attention, as torch's own attention formulas do.

Custom ops (vleff's Triton kernels) register formulas with ``register_flop_formula`` in
``vleff.kernels.flops``; :func:`flop_counter` imports that module, when it exists, before it
snapshots the registry.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "attention_backward_flops",
    "attention_flops",
    "count_flops",
    "extra_flop_formulas",
    "flop_counter",
    "mha_fastpath_disabled",
]

aten = torch.ops.aten
_KERNEL_FLOPS_MODULE = "vleff.kernels.flops"


def attention_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """Forward FLOPs of ``softmax(q kᵀ) v`` for ``[B, Hq, Nq, Dq]`` / ``[B, Hkv, Nk, D]`` shapes.

    Key/value heads may be fewer than query heads (grouped-query attention): every query
    head still does its own products.
    """
    b, hq, nq, dq = query_shape[-4:]
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * hq * nq * nk * dq + 2 * b * hq * nq * nk * dv


def attention_backward_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """Backward FLOPs of attention as torch counts its own fused kernels: the scores are
    recomputed (q kᵀ), then dP = dO vᵀ, dV = Pᵀ dO, dQ = dS k, dK = dSᵀ q (five products)."""
    b, hq, nq, dq = query_shape[-4:]
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * hq * nq * nk * (3 * dq + 2 * dv)


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return attention_backward_flops(query_shape, key_shape, value_shape)


def _native_mha_flop(
    query_shape, key_shape, value_shape, embed_dim: int, num_head: int, *args, out_shape=None, **kwargs
) -> int:
    """``nn.MultiheadAttention`` fast path: q/k/v projections, attention, output projection.

    Shapes are ``[B, N, E]`` (batch first) or ``[N, E]`` (unbatched). Nested tensors (the fast
    path folds a padding mask into one) have no dense shape; they raise rather than count 0.
    """
    if not isinstance(query_shape, torch.Size) or len(query_shape) not in (2, 3):
        raise NotImplementedError(
            f"cannot count FLOPs of nn.MultiheadAttention's fast path for query shape {query_shape!r}; "
            "count with disable_mha_fastpath=True (the default)"
        )
    q = tuple(query_shape) if len(query_shape) == 3 else (1, *query_shape)
    k = tuple(key_shape) if len(key_shape) == 3 else (1, *key_shape)
    b, nq, e = q
    nk = k[1]
    projections = 2 * b * nq * e * embed_dim + 2 * 2 * b * nk * e * embed_dim + 2 * b * nq * embed_dim * embed_dim
    head_dim = embed_dim // num_head
    attn = attention_flops((b, num_head, nq, head_dim), (b, num_head, nk, head_dim), (b, num_head, nk, head_dim))
    return projections + attn


def _overrideable_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _overrideable_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return attention_backward_flops(query_shape, key_shape, value_shape)


def _optional_op(name: str) -> Any | None:
    return getattr(aten, name, None)


def extra_flop_formulas() -> dict[Any, Callable[..., int]]:
    """The ``custom_mapping`` vleff adds to torch's registry (only ops this torch has)."""
    table = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu_flop,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_cpu_backward_flop,
        "_native_multi_head_attention": _native_mha_flop,
        "_scaled_dot_product_fused_attention_overrideable": _overrideable_flop,
        "_scaled_dot_product_fused_attention_overrideable_backward": _overrideable_backward_flop,
    }
    from torch.utils.flop_counter import flop_registry

    mapping = {}
    for name, formula in table.items():
        op = _optional_op(name)
        if op is not None and op not in flop_registry:  # a newer torch's own formula wins
            mapping[op] = formula
    return mapping


def _import_kernel_formulas() -> None:
    """Import ``vleff.kernels.flops`` (registers formulas of vleff's custom ops) if it exists."""
    try:
        spec = importlib.util.find_spec(_KERNEL_FLOPS_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        importlib.import_module(_KERNEL_FLOPS_MODULE)


@contextlib.contextmanager
def mha_fastpath_disabled(disable: bool = True) -> Iterator[None]:
    """Turn ``nn.MultiheadAttention``'s fused inference path off inside the block (restored after)."""
    mha = getattr(torch.backends, "mha", None)
    if not disable or mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def flop_counter(disable_mha_fastpath: bool = True) -> Iterator[FlopCounterMode]:
    """A ``FlopCounterMode`` (no printed table) that also counts CPU fused attention, the MHA
    fast path and vleff's registered custom ops. Use it for anything beyond one forward::

        with flop_counter() as fc:
            loss_fn(model(x)).backward()
        fc.get_total_flops()
    """
    _import_kernel_formulas()  # before the mode snapshots the registry
    with (
        mha_fastpath_disabled(disable_mha_fastpath),
        FlopCounterMode(display=False, custom_mapping=extra_flop_formulas()) as counter,
    ):
        yield counter


def count_flops(
    model: nn.Module | Callable[..., Any],
    *inputs: Any,
    no_grad: bool = True,
    disable_mha_fastpath: bool = True,
    **kwargs: Any,
) -> int:
    """FLOPs of one forward ``model(*inputs, **kwargs)`` (for the whole batch given).

    The model runs in whatever train/eval mode it is in (call ``model.eval()`` for inference
    FLOPs: token-pruning methods differ between modes). ``no_grad=True`` counts inference;
    with ``no_grad=False`` the forward is still counted alone (backward is not run).
    """
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    grad_ctx = torch.no_grad() if no_grad else contextlib.nullcontext()
    with grad_ctx, flop_counter(disable_mha_fastpath) as counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())
