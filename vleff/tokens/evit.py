"""EViT token reorganisation (Liang et al., ICLR 2022) on every supported image tower.

At chosen blocks, between attention and MLP, the ``⌈kr·(N − prefix)⌉`` non-prefix tokens that
the cls token attends to most (attention averaged over heads) are kept, in their original
order; optionally the other ("inattentive") tokens are fused into one extra token, appended
last. The block's attention already ran on all tokens, so no extra predictor is needed.

Fusion here is the cls-attention-*normalised* weighted mean of the fused tokens (the paper
writes an un-normalised weighted sum): the fused token then has the scale of a normal token,
which matters when fine-tuning a trained model. Its size (``state.size``) is the sum of the
sizes it absorbs, so proportional attention (ToMe's ``+log size``) stays consistent when both
methods are stacked.

>>> vleff.apply_evit(model, keep_rate=0.7, locations=(3, 6, 9))
>>> vleff.set_evit_keep_rate(model, 0.9)     # schedules change it without re-applying
>>> vleff.remove_evit(model)

Training: the keep rate usually follows :func:`keep_rate_schedule` (1 until a start epoch,
then cosine to the target); :class:`vleff.callbacks.EViT` does that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from vleff.backbones import BlockInfo, Modality, TokenState, TowerAdapter
from vleff.registry import Method, register_method
from vleff.tokens.common import hooks_named, install_hook, remove_hook
from vleff.tokens.pruning import check_locations, check_ratio, count_for_ratio, keep_indices, select_tokens

HOOK_NAME = "evit"


class EViTHook:
    """The EViT :class:`~vleff.backbones.TokenHook` of one tower."""

    name = HOOK_NAME

    def __init__(self, locations: list[int], keep_rate: float, fuse: bool) -> None:
        self.locations = locations
        self.keep_rate = keep_rate
        self.fuse = fuse

    def start(self, state: TokenState, x: torch.Tensor) -> None:
        pass

    def needs_cls_attention(self, index: int) -> bool:
        return self.keep_rate < 1 and index in self.locations

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if self.keep_rate >= 1 or info.index not in self.locations:
            return x
        assert info.cls_attention is not None
        p = state.num_prefix
        n = x.shape[1] - p
        k = count_for_ratio(n, self.keep_rate, "ceil")
        if k >= n:
            return x
        scores = info.cls_attention[:, p:]
        idx = keep_indices(scores, k, p)
        if not self.fuse:
            return select_tokens(x, state, idx)
        # dropped = 1 for the inattentive tokens, computed before select_tokens changes the state
        dropped = torch.ones_like(scores).scatter(1, idx[:, p:] - p, 0.0)
        weight = scores * dropped
        weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        fused = (weight.to(x.dtype)[..., None] * x[:, p:]).sum(dim=1, keepdim=True)
        size = state.sizes_or_ones(x)
        fused_size = (size[:, p:, 0] * dropped).sum(dim=1)[:, None, None]
        fused_source = None
        if state.source is not None:
            fused_source = (state.source[:, p:] * dropped[..., None].to(state.source.dtype)).sum(dim=1, keepdim=True)
        fused_keep = None
        if state.keep is not None:  # stacked with a masking method: the fused token is kept
            fused_keep = torch.ones_like(state.keep[:, :1])
        state.size = size
        x = select_tokens(x, state, idx)
        state.size = torch.cat([state.size, fused_size], dim=1)
        if fused_source is not None:
            state.source = torch.cat([state.source, fused_source], dim=1)
        if fused_keep is not None:
            state.keep = torch.cat([state.keep, fused_keep], dim=1)
        return torch.cat([x, fused], dim=1)


def keep_rate_schedule(epoch: float, target: float, start_epoch: float = 0.0, end_epoch: float | None = None) -> float:
    """EViT's keep-rate warm-up: 1 until ``start_epoch``, then a cosine from 1 down to
    ``target`` reached at ``end_epoch`` (and kept after it). ``epoch`` may be fractional
    (``current_epoch + batch_idx / batches_per_epoch``) so the rate changes every step."""
    target = check_ratio("keep_rate", target)
    if epoch < start_epoch:
        return 1.0
    if end_epoch is None or end_epoch <= start_epoch or epoch >= end_epoch:
        return target
    t = (epoch - start_epoch) / (end_epoch - start_epoch)
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class EViTSchedule:
    """The keep-rate schedule as a value object (shared by the callback and the mixin)."""

    target: float = 0.7
    start_epoch: float = 0.0
    end_epoch: float | None = None

    def __post_init__(self) -> None:
        self.target = check_ratio("keep_rate", self.target)
        if self.start_epoch < 0:
            raise ValueError(f"start_epoch={self.start_epoch!r} must be >= 0")
        if self.end_epoch is not None and self.end_epoch < self.start_epoch:
            raise ValueError(f"end_epoch={self.end_epoch!r} must be >= start_epoch={self.start_epoch!r}")

    def __call__(self, epoch: float) -> float:
        return keep_rate_schedule(epoch, self.target, self.start_epoch, self.end_epoch)


def apply_evit(model: nn.Module, keep_rate: float = 0.7, locations: Sequence[int] | None = None,
               fuse: bool = True, modality: Modality = "image") -> nn.Module:
    """Prune inattentive tokens at ``locations`` of every ``modality`` tower of ``model`` (in place).

    Args:
        model: any model holding a supported image tower with a cls token (timm ViT/DeiT,
            open_clip CLIP, Hugging Face CLIP/BLIP, or a LightningModule wrapping one).
        keep_rate: fraction of the non-prefix tokens kept at each location, in (0, 1];
            hierarchical (each location keeps that fraction of what is left).
        locations: block indices (strictly increasing); default three evenly spaced blocks,
            ``(3, 6, 9)`` for 12 blocks.
        fuse: fuse the pruned tokens into one extra token (weighted by cls attention).
        modality: only ``"image"``: text towers pool at the EOT position.

    Raises:
        ValueError: ``keep_rate`` outside (0, 1], bad ``locations``, a non-image modality, or
            a tower without a cls token (EViT ranks tokens by the cls token's attention).

    Returns:
        ``model``, for chaining. Applying twice replaces the earlier settings.
    """
    keep_rate = check_ratio("keep_rate", keep_rate)
    if modality != "image":
        raise ValueError(f"modality={modality!r}: EViT prunes image tokens only")
    if not isinstance(fuse, bool):
        raise ValueError(f"fuse={fuse!r} must be a boolean")
    if hooks_named(model, HOOK_NAME):
        remove_evit(model)

    def make_hook(tower: TowerAdapter) -> EViTHook:
        if not tower.has_cls_token or tower.num_prefix_tokens < 1:
            raise ValueError(f"EViT needs a cls token (it ranks tokens by the cls token's attention), but "
                             f"{tower.describe()} has none (pooling={tower.pooling!r}); use DynamicViT or ToMe")
        return EViTHook(check_locations("locations", locations, len(tower.blocks())), keep_rate, fuse)

    try:
        install_hook(model, make_hook, modality)
    except ValueError:
        remove_hook(model, HOOK_NAME)  # a later tower failed: leave no half-applied model
        raise
    return model


def remove_evit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_evit`: the towers run their own forward again."""
    if remove_hook(model, HOOK_NAME) == 0:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}; nothing to remove")
    return model


def set_evit_keep_rate(model: nn.Module, keep_rate: float) -> None:
    """Change the keep rate of an applied EViT (schedules; no re-patching)."""
    keep_rate = check_ratio("keep_rate", keep_rate)
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}; call apply_evit first")
    for hook in hooks:
        hook.keep_rate = keep_rate


def evit_keep_rate(model: nn.Module) -> float:
    """The keep rate of the first EViT-patched tower."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}")
    return float(hooks[0].keep_rate)


register_method(Method(name="evit", apply=apply_evit, remove=remove_evit, defaults={"keep_rate": 0.7},
                       kind="tokens", description="EViT: keep the tokens the cls token attends to, fuse the rest"))
