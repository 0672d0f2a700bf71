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

Causal text towers: on a causal encoder pooled at its EOT (CLIP) the EOT ranks the tokens. On a
causal decoder (BLIP's ``text_decoder``, a prediction at every position) EViT is allowed
because it stays causal: the ranking token is [DEC] at position 0, which the causal mask lets
see no later token, so every candidate scores 0 and the kept tokens are the first ``k`` real
ones (``k`` from the padding mask, not from the content); the fused token gets weight 0 from
each dropped token and holds only the dropped positions, all after the kept ones. Changing
token ``t`` leaves every output before ``t`` unchanged (tested); the outputs at dropped
positions are the fused token's.

>>> vleff.apply_evit(model, keep_rate=0.7, locations=(3, 6, 9))
>>> vleff.update(model, "evit", keep_rate=0.9)   # schedules change it without re-applying
>>> vleff.remove_evit(model)

Training: the keep rate usually follows :func:`keep_rate_schedule` (1 until a start epoch,
then cosine to the target); :class:`vleff.callbacks.EViT` does that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter, TowerHook
from vleff.backbones.text import PAD, PROTECTED
from vleff.checks import check_bool, check_number, check_ratio, check_towers
from vleff.kernels.order import stable_argsort
from vleff.registry import MethodConfig
from vleff.tokens.common import attach_hooks, hooks_named, remove_hooks, select_towers
from vleff.tokens.pruning import check_locations, count_for_ratio, keep_indices

HOOK_NAME = "evit"
TOWERS = ("image", "text")


@dataclass
class EViTConfig(MethodConfig):
    """EViT's settings.

    Attributes:
        keep_rate: fraction of the non-prefix tokens kept at each location, in (0, 1];
            hierarchical (each location keeps that fraction of what is left).
        locations: block indices (strictly increasing); ``None``: three evenly spaced
            blocks, ``(3, 6, 9)`` for 12 blocks.
        fuse: fuse the pruned tokens into one extra token (weighted by cls attention).
        towers: ``"image"`` (towers with a cls token, ranked by its attention), ``"text"``
            (ranked by the EOT token's attention; the EOT is always kept) or ``"all"``.
    """

    method = "evit"
    keep_rate: float = 0.7
    locations: Sequence[int] | None = None
    fuse: bool = True
    towers: str = "image"

    def __post_init__(self) -> None:
        self.keep_rate = check_ratio("keep_rate", self.keep_rate)
        check_bool("fuse", self.fuse)
        check_towers(self.towers, TOWERS)
        if self.locations is not None:
            self.locations = check_locations("locations", self.locations, 10_000)


class EViTHook(TowerHook):
    """The EViT hook of one tower."""

    name = HOOK_NAME
    #: a pure function of the block input and the token state it started from: replays exactly
    replayable = True

    def __init__(self, config: EViTConfig, depth: int, query: int | str = 0) -> None:
        self.config = config
        self.locations = check_locations("locations", config.locations, depth)
        self.query = query  # the token whose attention ranks the others: cls (0), or a text tower's "eot"

    def configure(self, config: EViTConfig) -> None:
        self.config = config

    @property
    def keep_rate(self) -> float:
        return self.config.keep_rate

    def attention_rows(self, index: int) -> tuple[int, ...]:
        return (self.query,) if self.config.keep_rate < 1 and index in self.locations else ()

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if self.config.keep_rate >= 1 or info.index not in self.locations:
            return x
        if self.query == "eot":
            return self._between_text(x, info, state)
        p = state.num_prefix
        n = x.shape[1] - p
        k = count_for_ratio(n, self.config.keep_rate, "ceil")
        if k >= n:
            return x
        scores = info.row_attention(0)
        idx = keep_indices(scores[:, p:], k, p)
        if not self.config.fuse:
            return state.select(x, idx)
        dropped = torch.ones_like(scores, dtype=torch.bool).scatter(1, idx, False)  # prefix is in idx
        return _select_and_fuse(x, state, idx, scores, dropped)

    def _between_text(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        """Text towers: rank by the EOT's attention, keep the EOT, size the keep count from each
        sentence's real tokens (so it does not depend on padding), fill the batch's common
        length with padding tokens, fuse only real tokens."""
        scores = info.row_attention("eot")
        eot = state.get(PROTECTED).bool()
        pad = state.get(PAD).bool()
        real = ~eot & ~pad
        n_real = real.sum(dim=1)
        k_real = torch.ceil(torch.round(n_real.double() * self.config.keep_rate, decimals=6)).long()
        k_real = torch.minimum(torch.clamp(k_real, min=1), n_real)
        if bool((k_real >= n_real).all()):
            return x
        ranked = scores.masked_fill(~real, float("-inf"))
        order = stable_argsort(ranked, descending=True)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(order.shape[1], device=x.device).expand_as(order)
        )
        top = real & (rank < k_real[:, None])
        # keep order: EOT, the top real tokens, then padding (filler), then the other real tokens
        key = torch.where(eot, 4.0, torch.where(top, 2.0 + scores, torch.where(pad, 1.0, scores.clamp(0, 1) - 1.0)))
        total = int((k_real + 1).max())
        idx = key.topk(total, dim=1).indices.sort(dim=1).values
        if not self.config.fuse:
            return state.select(x, idx)
        dropped = real & ~torch.zeros_like(real).scatter(1, idx, True)  # padding is discarded, not fused
        return _select_and_fuse(x, state, idx, scores, dropped)


def _select_and_fuse(
    x: torch.Tensor, state: TokenState, idx: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor
) -> torch.Tensor:
    """Keep tokens ``idx`` and append one token fusing the ``dropped`` ones (``[B, N]`` bool),
    weighted by their attention ``scores`` normalised over them; every token field follows."""
    weight = scores * dropped
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    fused = (weight.to(x.dtype)[..., None] * x).sum(dim=1, keepdim=True)
    values = state.fuse(dropped)
    return state.append(state.select(x, idx), fused, values)


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
        self.start_epoch = check_number("start_epoch", self.start_epoch, low=0)
        if self.end_epoch is not None:
            self.end_epoch = check_number("end_epoch", self.end_epoch, low=self.start_epoch)

    def __call__(self, epoch: float) -> float:
        return keep_rate_schedule(epoch, self.target, self.start_epoch, self.end_epoch)


def training_progress(
    global_step: int, accumulate_grad_batches: int, batches_per_epoch: object, current_epoch: int
) -> float:
    """Epochs of training done, fractional, from the optimizer step count: ``global_step ·
    accumulate / batches per epoch``. Counting from the step (not ``current_epoch + batch_idx /
    batches``) keeps a resumed run on the same schedule: Lightning restores the step exactly but
    can restart a resumed epoch at another batch index."""
    if isinstance(batches_per_epoch, int) and batches_per_epoch > 0:
        return global_step * accumulate_grad_batches / batches_per_epoch
    return float(current_epoch)


def apply_evit(model: nn.Module, config: EViTConfig | None = None, **settings: Any) -> nn.Module:
    """Prune inattentive tokens at ``locations`` of every image tower of ``model`` (in place).

    Args:
        model: any model holding a supported image tower with a cls token (timm ViT/DeiT,
            open_clip CLIP, Hugging Face CLIP/BLIP, or a LightningModule wrapping one).
        config: an :class:`EViTConfig`; ``settings`` (``keep_rate=0.5`` ...) build or update it.

    Raises:
        ValueError: a bad setting, or a tower without a cls token (EViT ranks tokens by the
            cls token's attention).

    Returns:
        ``model``, for chaining. Applying twice replaces the earlier settings.
    """
    cfg = EViTConfig.build(config, **settings)

    def make_hook(tower: TowerAdapter) -> EViTHook:
        if tower.modality == "text":
            return EViTHook(cfg, len(tower.blocks()), query="eot")
        if not tower.has_cls_token or tower.num_prefix_tokens < 1:
            raise ValueError(
                f"EViT needs a cls token (it ranks tokens by the cls token's attention), but "
                f"{tower.describe()} has none (pooling={tower.pooling!r}); use DynamicViT or ToMe"
            )
        return EViTHook(cfg, len(tower.blocks()))

    towers = select_towers(model, cfg.towers)
    hooks = [make_hook(t) for t in towers]  # every check before any change
    if hooks_named(model, HOOK_NAME):
        remove_evit(model)
    attach_hooks(towers, hooks)
    return model


def remove_evit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_evit`: the towers run their own forward again."""
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}; nothing to remove")
    return model


def update_evit(model: nn.Module, **changes: Any) -> None:
    """Change the keep rate (or ``fuse``) of an applied EViT (schedules; no re-patching)."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}; call apply_evit first")
    old = hooks[0].config
    new = old.replace(**changes)
    for key in ("locations", "towers"):
        if getattr(new, key) != getattr(old, key):
            raise ValueError(
                f"{key} cannot change on an applied EViT ({getattr(old, key)!r} -> "
                f"{getattr(new, key)!r}); apply it again"
            )
    for hook in hooks:
        hook.configure(new)


def evit_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def evit_keep_rate(model: nn.Module) -> float:
    """The keep rate of the first EViT-patched tower."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"EViT is not applied to this {type(model).__name__}")
    return float(hooks[0].config.keep_rate)
