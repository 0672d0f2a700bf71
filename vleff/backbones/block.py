"""The generic block forward: one implementation of a pre-norm block for every family.

With no hook installed it reproduces each library's own block (same op order, fused or
explicit attention as the library does), which the equivalence tests check. Hooks change
the token sequence between attention and MLP, and the token state adds proportional
attention (``+log size``) and DynamicViT-style keep masks to the attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vleff.backbones.base import AttentionConfig, TowerAdapter
from vleff.backbones.state import BlockInfo, TokenHook, TokenState

KEEP_MASK_EPS = 1e-6


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
    ``w_ij = exp(l_ij) * (keep_j + (1 - keep_j)·δ_ij)``, normalised with a small epsilon.

    The logits are shifted by the row maximum over the *allowed* keys only. Shifting by the
    maximum over all keys (as DynamicViT's reference does) lets a dropped key whose logit is
    far above the others underflow every allowed weight, and the epsilon term then spreads
    the row uniformly over all tokens, dropped ones included. Dropped keys' shifted logits
    are capped at 0: their forward weight is 0 anyway, and the cap keeps the gradient with
    respect to ``keep`` finite.
    """
    n = logits.shape[-1]
    eye = torch.eye(n, device=logits.device, dtype=logits.dtype)
    k = keep.to(logits.dtype)[:, None, None, :]
    weight = k + (1.0 - k) * eye
    allowed = weight.detach() > 0
    row_max = logits.detach().masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
    shifted = logits - row_max
    shifted = torch.where(allowed, shifted, shifted.clamp(max=0.0))
    e = shifted.exp() * weight
    return (e + KEEP_MASK_EPS / n) / (e.sum(dim=-1, keepdim=True) + KEEP_MASK_EPS)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: AttentionConfig, training: bool,
              bias: torch.Tensor | None, is_causal: bool, keep: torch.Tensor | None) -> torch.Tensor:
    """Multi-head attention ``[B, H, N, Dh]`` the way the library block would compute it."""
    dropout_p = cfg.dropout_p if training else 0.0
    if cfg.fused and keep is None:
        if is_causal and bias is not None:
            bias = bias + causal_bias(q.shape[-2], bias.dtype, bias.device)
            is_causal = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=cfg.scale)
    logits = (q * cfg.scale) @ k.transpose(-2, -1)
    if is_causal:
        bias = _add(bias, causal_bias(q.shape[-2], logits.dtype, logits.device))
    if bias is not None:
        logits = logits + bias
    if keep is not None:
        probs = keep_masked_softmax(logits.float(), keep).to(q.dtype)
    elif cfg.softmax_fp32:
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        probs = logits.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def cls_attention(q: torch.Tensor, k: torch.Tensor, cfg: AttentionConfig, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities from token 0 to every token, averaged over heads: ``[B, N]``.

    Computed separately from the main attention (O(N) extra work), so fused attention stays fused.
    """
    logits = (q[:, :, :1].float() * cfg.scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias.float()[..., :1, :] if bias.shape[-2] > 1 else logits + bias.float()
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def run_block(adapter: TowerAdapter, state: TokenState, hooks: list[TokenHook], block: torch.nn.Module,
              index: int, depth: int, x: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """One block of ``adapter``'s tower with ``hooks`` applied; see the module docstring."""
    parts = adapter.parts(block)
    cfg = adapter.attention_config(block)
    for hook in hooks:  # optional entry point: decide before the block's attention (DynamicViT)
        before = getattr(hook, "before", None)
        if before is not None:
            x = before(x, index, depth, state)
    state.token_counts.append(x.shape[1])
    if mask is not None and state.num_input_tokens != x.shape[1]:
        raise RuntimeError(
            f"{adapter.describe()}: block {index} got a library attention mask for "
            f"{state.num_input_tokens} tokens but the sequence now has {x.shape[1]}; token "
            "reduction is not supported on towers that need attention masks")

    h = parts.norm1(x)
    q, k, v = adapter.qkv(block, h)
    bias = _add(mask_to_bias(mask, q.dtype), state.attention_bias(q.dtype))
    o = attention(q, k, v, cfg, block.training, bias, is_causal, state.keep)
    o = o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
    x = x + parts.drop_path1(parts.ls1(adapter.attn_out(block, o, h)))

    if hooks:
        cls_attn = None
        if any(hook.needs_cls_attention(index) for hook in hooks):
            cls_attn = cls_attention(q, k, cfg, bias)
        info = BlockInfo(index=index, depth=depth, keys=k, cls_attention=cls_attn)
        for hook in hooks:
            x = hook.between(x, info, state)

    x = x + parts.drop_path2(parts.ls2(parts.mlp(parts.norm2(x))))
    return x


def head_dim_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
