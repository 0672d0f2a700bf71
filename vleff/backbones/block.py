"""The generic block forward: one implementation of a pre-norm block for every family
(and of a post-norm block with cross-attention, :func:`run_post_norm_block`, for BLIP text).

A block is two residual branches, F (:func:`attention_branch`) and G (:func:`mlp_branch`):
``x = x + F(x); x = x + G(x)``. :func:`run_block` composes them with the hooks' entry points
(see :mod:`vleff.backbones.hooks`); reversible couplings recombine F and G themselves and a
method that wraps the MLP (MemVP) wraps G, so there is one copy of the block. Adapter methods
rewrite a sublayer's output through the hooks' ``branch`` entry and prompt methods add keys and
values in front of the attention's through ``attention_prefix``: no method copies the block.

With no hook installed it reproduces each library's own block (same op order, fused or
explicit attention as the library does), which the equivalence tests check. The attention
gets the library's mask plus every hook's additive bias and keep mask; the block knows no
method's fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones.base import AttentionConfig, CrossInputs, TowerAdapter
from vleff.backbones.hooks import KEEP_MASK_EPS, BlockInfo, TowerHook
from vleff.backbones.state import TokenState


def mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A library attention mask (bool: True = may attend; float: additive) as an additive bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def causal_bias(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def keep_masked_softmax(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax where keys with ``keep = 0`` get no weight except from themselves.

    Differentiable in ``keep`` (DynamicViT trains its predictors through it):
    ``w_ij = exp(l_ij) * (keep_j + (1 - keep_j)·δ_ij)``, normalised with a small epsilon spread
    over the keys the attention bias allows.

    The logits are shifted by the row maximum over the *allowed* keys only. Shifting by the
    maximum over all keys (as DynamicViT's reference does) lets a dropped key whose logit is
    far above the others underflow every allowed weight, and the epsilon term then spreads
    the row uniformly over all tokens, dropped ones included. Dropped keys' shifted logits
    are capped at 0: their forward weight is 0 anyway, and the cap keeps the gradient with
    respect to ``keep`` finite.
    """
    n = logits.shape[-1]
    # query i's own key: key i, or key P + i behind a prefix of P keys every query sees
    eye = torch.eye(n, device=logits.device, dtype=logits.dtype)[n - logits.shape[-2] :]
    k = keep.to(logits.dtype)[:, None, None, :]
    weight = k + (1.0 - k) * eye
    allowed = weight.detach() > 0
    row_max = logits.detach().masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
    shifted = logits - row_max
    shifted = torch.where(allowed, shifted, shifted.clamp(max=0.0))
    e = shifted.exp() * weight
    # the epsilon spreads over the keys the attention bias lets through only: a causal mask or
    # padding (-inf logits) must hide its keys exactly, or later positions leak into earlier
    # ones at 1e-6; without -inf logits this is DynamicViT's formula exactly
    spread = (KEEP_MASK_EPS / n) * torch.isfinite(logits.detach()).to(logits.dtype)
    return (e + spread) / (e.sum(dim=-1, keepdim=True) + spread.sum(dim=-1, keepdim=True))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: AttentionConfig,
    training: bool,
    bias: torch.Tensor | None,
    is_causal: bool,
    keep: torch.Tensor | None,
    need_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention ``[B, H, N, Dh]`` the way the library block would compute it, and the
    attention probabilities when ``need_probs`` (which forces the explicit path)."""
    dropout_p = cfg.dropout_p if training else 0.0
    if cfg.fused and keep is None and not need_probs:
        if is_causal and bias is not None:
            bias = bias + causal_bias(q.shape[-2], bias.dtype, bias.device)
            is_causal = False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=dropout_p, is_causal=is_causal, scale=cfg.scale
        ), None
    logits = (q * cfg.scale) @ k.transpose(-2, -1)
    if is_causal:
        bias = _add(bias, causal_bias(q.shape[-2], logits.dtype, logits.device))
    if bias is not None:
        logits = logits + bias
    if keep is not None:
        probs = keep_masked_softmax(logits.float(), keep).to(q.dtype)
    elif cfg.softmax_fp32 or need_probs:
        # float32 at least (a float64 model keeps float64: reference comparisons to float noise)
        probs = logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
    else:
        probs = logits.softmax(dim=-1)
    kept_probs = probs if need_probs else None
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v, kept_probs


def attention_branch(
    adapter: TowerAdapter,
    block: nn.Module,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    keep: torch.Tensor | None = None,
    info: BlockInfo | None = None,
    hooks: Sequence[TowerHook] = (),
) -> torch.Tensor:
    """F: the attention residual branch ``drop_path1(ls1(attn_out(attention(qkv(norm1(x))))))``.

    Returns the branch output (the block adds it to ``x``). When ``info`` is given it is filled
    with the normed input, q, k, v, per-head outputs and (if it asked) the probabilities.
    Reversible couplings call F and :func:`mlp_branch` (G) directly to recombine them.
    ``hooks`` (with ``info``) add their attention prefixes (:meth:`TowerHook.attention_prefix`)
    and rewrite the sublayer output (:meth:`TowerHook.branch`, ``"attention"``).
    """
    parts = adapter.parts(block)
    h = parts.norm1(x)
    q, k, v = adapter.qkv(block, h)
    o = _attend(adapter, block, h, q, k, v, bias, is_causal, keep, info, hooks_prefix(hooks, info, h))
    out = branch_output(hooks, "attention", x, adapter.attn_out(block, o, h), info)
    return parts.drop_path1(parts.ls1(out))


def hooks_prefix(
    hooks: Sequence[TowerHook], info: BlockInfo | None, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every hook's attention prefix for this block, concatenated along the keys (``None``: none)."""
    if not hooks or info is None:
        return None
    assert info.state is not None
    found = [p for hook in hooks if (p := hook.attention_prefix(info, info.state, h)) is not None]
    if not found:
        return None
    if len(found) == 1:
        return found[0]
    batch = h.shape[0]
    keys = torch.cat([k.expand(batch, -1, -1, -1) for k, _ in found], dim=-2)
    return keys, torch.cat([v.expand(batch, -1, -1, -1) for _, v in found], dim=-2)


def branch_output(
    hooks: Sequence[TowerHook], name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo | None
) -> torch.Tensor:
    """``out`` (sublayer ``name``'s output, before layer scale, drop path and the residual add,
    read from the stream ``x``) rewritten by every hook's :meth:`TowerHook.branch` in turn."""
    if not hooks or info is None:
        return out
    assert info.state is not None
    for hook in hooks:
        out = hook.branch(name, x, out, info, info.state)
    return out


def _attend(
    adapter: TowerAdapter,
    block: nn.Module,
    h: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    is_causal: bool,
    keep: torch.Tensor | None,
    info: BlockInfo | None,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Every layout's self-attention: the library's attention computation, ``info`` filled (the
    normed input ``h``, q, k, v, per-head outputs, probabilities if asked), heads merged ``[B, N, C]``.

    ``prefix``: extra keys and values ``[B or 1, H, P, Dh]`` in front of the tokens' own, which
    every query sees (the causal mask, padding and keep mask cover the tokens only). ``info``
    describes the tokens: its keys, bias and probabilities leave the prefix columns out."""
    cfg = adapter.attention_config(block)
    if bias is not None:
        bias = bias.to(q.dtype)
    need_probs = info is not None and info.want_probs
    if prefix is None:
        o, probs = attention(q, k, v, cfg, block.training, bias, is_causal, keep, need_probs)
    else:
        o, probs = _attention_with_prefix(q, k, v, prefix, cfg, block.training, bias, is_causal, keep, need_probs)
    if info is not None:
        info.cfg, info.bias, info.keep = cfg, _causal_full(bias, is_causal, q), keep
        info._h, info._q, info._k, info._v, info._head_outputs, info._probs = h, q, k, v, o, probs
    # explicit width (heads x head dim), not -1: a batch of 0 samples has no size to infer it from
    return o.transpose(1, 2).reshape(h.shape[0], h.shape[1], o.shape[1] * o.shape[-1])


def _attention_with_prefix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    cfg: AttentionConfig,
    training: bool,
    bias: torch.Tensor | None,
    is_causal: bool,
    keep: torch.Tensor | None,
    need_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attention` over ``prefix`` keys/values followed by the tokens' own: the masks gain
    ``P`` leading columns every query may attend to (bias 0, keep 1), the causal mask is written
    out first so it covers the tokens only; the probabilities returned drop the prefix columns."""
    pk, pv = prefix
    batch, p = q.shape[0], pk.shape[-2]
    k = torch.cat([pk.to(k.dtype).expand(batch, -1, -1, -1), k], dim=-2)
    v = torch.cat([pv.to(v.dtype).expand(batch, -1, -1, -1), v], dim=-2)
    if is_causal:
        bias = _add(bias, causal_bias(q.shape[-2], q.dtype, q.device))
        is_causal = False
    if bias is not None:
        bias = F.pad(bias, (p, 0))
    if keep is not None:
        keep = F.pad(keep, (p, 0), value=1.0)
    o, probs = attention(q, k, v, cfg, training, bias, is_causal, keep, need_probs)
    return o, None if probs is None else probs[..., p:]


def mlp_branch(
    adapter: TowerAdapter,
    block: nn.Module,
    x: torch.Tensor,
    hooks: Sequence[TowerHook] = (),
    info: BlockInfo | None = None,
) -> torch.Tensor:
    """G: the MLP residual branch ``drop_path2(ls2(mlp(norm2(x))))``; ``hooks`` (with ``info``)
    rewrite the MLP's output (:meth:`TowerHook.branch`, ``"mlp"``)."""
    parts = adapter.parts(block)
    out = branch_output(hooks, "mlp", x, parts.mlp(parts.norm2(x)), info)
    return parts.drop_path2(parts.ls2(out))


def _causal_full(bias: torch.Tensor | None, is_causal: bool, q: torch.Tensor) -> torch.Tensor | None:
    """The bias as hooks should see it: with the causal mask written out when the block used ``is_causal``."""
    if not is_causal:
        return bias
    return _add(bias, causal_bias(q.shape[-2], q.dtype, q.device))


def hooks_bias(hooks: list[TowerHook], state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
    bias = None
    for hook in hooks:
        bias = _add(bias, hook.attention_bias(state, dtype))
    return bias


def hooks_keep(hooks: list[TowerHook], state: TokenState) -> torch.Tensor | None:
    keep = None
    for hook in hooks:
        k = hook.attention_keep(state)
        if k is not None:
            keep = k if keep is None else keep * k
    return keep


def _enter_block(
    adapter: TowerAdapter,
    state: TokenState,
    hooks: list[TowerHook],
    block: nn.Module,
    index: int,
    depth: int,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    cache: Any = None,
) -> tuple[torch.Tensor, BlockInfo, torch.Tensor | None, bool]:
    """What every block layout does before its attention: ``before`` hooks, the hooks' say on the
    library mask, the token count, the attention bias (library mask + hooks' biases)."""
    info = BlockInfo(index=index, depth=depth, block=block, state=state, adapter=adapter, cache=cache)
    for hook in hooks:
        x = hook.before(x, info, state)
    for hook in hooks:
        mask, is_causal = hook.library_mask(mask, is_causal, state)
    state.token_counts.append(x.shape[1])
    if mask is not None and state.num_input_tokens != x.shape[1]:
        raise RuntimeError(
            f"{adapter.describe()}: block {index} got a library attention mask for "
            f"{state.num_input_tokens} tokens but the sequence now has {x.shape[1]}; token "
            "reduction is not supported on this tower's attention masks"
        )
    info.want_probs = any(hook.needs_attention_probs(index) for hook in hooks)
    bias = _add(
        mask_to_bias(mask, x.dtype if x.is_floating_point() else torch.float32), hooks_bias(hooks, state, x.dtype)
    )
    return x, info, bias, is_causal


def _between(hooks: list[TowerHook], info: BlockInfo, state: TokenState, x: torch.Tensor) -> torch.Tensor:
    """The ``between`` hooks, with the requested attention rows computed first (so they follow
    an earlier hook's reduction) and the block's info visible to the state's reductions."""
    for row in sorted({r for hook in hooks for r in hook.attention_rows(info.index)}):
        info.row_attention(row)
    state.block_info = info
    try:
        for hook in hooks:
            x = hook.between(x, info, state)
    finally:
        state.block_info = None
    return x


def run_block(
    adapter: TowerAdapter,
    state: TokenState,
    hooks: list[TowerHook],
    block: nn.Module,
    index: int,
    depth: int,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
) -> torch.Tensor:
    """One block of ``adapter``'s tower with ``hooks`` applied; see the module docstring."""
    x, info, bias, is_causal = _enter_block(adapter, state, hooks, block, index, depth, x, mask, is_causal)
    x = x + attention_branch(adapter, block, x, bias, is_causal, hooks_keep(hooks, state), info, hooks)
    x = _between(hooks, info, state, x)
    x = x + mlp_branch(adapter, block, x, hooks, info)
    for hook in hooks:
        x = hook.after(x, info, state)
    return x


# --- post-norm blocks with cross-attention (layout "post_norm_cross": Hugging Face BLIP text) ---------
def post_norm_attention(
    adapter: TowerAdapter,
    block: nn.Module,
    x: torch.Tensor,
    cross: CrossInputs,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    keep: torch.Tensor | None = None,
    info: BlockInfo | None = None,
    hooks: Sequence[TowerHook] = (),
) -> torch.Tensor:
    """The self-attention sub-layer of a post-norm block: ``norm1(x + attn_out(attention(qkv(x))))``.

    Unlike :func:`attention_branch` it returns the new ``x`` (the norm follows the residual add,
    so there is no branch to add). Queries, keys and values are read from ``x`` itself; the
    library's key/value cache (generation) is applied by :meth:`TowerAdapter.cached_kv` (an
    attention prefix of the hooks comes after it: it is never cached). ``info`` is filled as in
    :func:`attention_branch` (``h`` is ``x``: there is no pre-norm); ``hooks`` act as there.
    """
    parts = adapter.parts(block)
    q, k, v = adapter.qkv(block, x)
    k, v = adapter.cached_kv(block, k, v, cross)
    o = _attend(adapter, block, x, q, k, v, bias, is_causal, keep, info, hooks_prefix(hooks, info, x))
    out = branch_output(hooks, "attention", x, adapter.attn_out(block, o, x), info)
    return parts.norm1(x + parts.drop_path1(parts.ls1(out)))


def post_norm_ffn(
    adapter: TowerAdapter,
    block: nn.Module,
    x: torch.Tensor,
    hooks: Sequence[TowerHook] = (),
    info: BlockInfo | None = None,
) -> torch.Tensor:
    """The feed-forward sub-layer of a post-norm block: ``norm2(x + ffn(x))`` (``hooks`` rewrite
    ``ffn(x)``, the output after its dropout, as ``"mlp"``)."""
    parts = adapter.parts(block)
    out = branch_output(hooks, "mlp", x, adapter.ffn(block, x), info)
    return parts.norm2(x + parts.drop_path2(parts.ls2(out)))


def run_post_norm_block(
    adapter: TowerAdapter,
    state: TokenState,
    hooks: list[TowerHook],
    block: nn.Module,
    index: int,
    depth: int,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    cross: CrossInputs,
) -> torch.Tensor:
    """One post-norm block (self-attention, cross-attention, FFN) with ``hooks`` applied.

    The entry points are :func:`run_block`'s: ``before``; the hooks' library mask, attention
    bias and keep mask act on the *self*-attention; ``between`` runs after the self-attention
    and before the cross-attention (MADTP prunes BLIP's text there), so the cross-attention
    and the FFN run on the reduced text while the image keys keep their length; ``after``.
    """
    x, info, bias, is_causal = _enter_block(adapter, state, hooks, block, index, depth, x, mask, is_causal, cross.cache)
    x = post_norm_attention(adapter, block, x, cross, bias, is_causal, hooks_keep(hooks, state), info, hooks)
    n_before = x.shape[1]
    x = _between(hooks, info, state, x)
    if cross.cache is not None and x.shape[1] != n_before:
        raise RuntimeError(
            f"{adapter.describe()}: block {index}: a hook changed the number of tokens while the library "
            "runs with a key/value cache (generation); the cache would hold keys of tokens that no longer "
            "exist. Pass use_cache=False (training) or remove the token-reduction method for generation"
        )
    x = adapter.cross_attention(block, x, cross)
    x = post_norm_ffn(adapter, block, x, hooks, info)
    for hook in hooks:
        x = hook.after(x, info, state)
    return x
