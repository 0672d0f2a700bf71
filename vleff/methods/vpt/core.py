"""VPT-deep (Jia et al., ECCV 2022): ``N`` learned prompt tokens per block, replaced before every block.

The reference (KMnP/vpt ``PromptedTransformer``) inserts block 0's ``N`` prompts after the class
token and, before every later block, overwrites the prompt slots with that block's own prompts; the
slots are dropped before the final norm. A prompt slot's output is never read, so block ``i``'s
prompts act on the other tokens only through the keys and values block ``i`` computes for them.
vleff gives exactly those to the block's attention as a prefix (:mod:`vleff.side.prompts`: the
block's own ``norm1`` and projections of ``P_i``), which equals the reference's forward (tested to
1e-10 in float64) without inserting a token: pooling, registers, the text EOT and token methods are
untouched.

Settings as the reference: ``N`` = 5 (its config; the paper sweeps 1-200), prompt dropout 0 (applied
to the prompts before the block, per sample), init uniform ``±√(6 / (3·p·p + C))`` (Xavier over the
patch embedding's fan-in; ±0.0625 on ViT-B/16). On text towers (no patch embedding) vleff uses
``±√(6 / (C + C))``. Trained: the prompts (and a timm head); the backbone is frozen and, under the
callback, kept in eval mode (the reference's ``train()`` does the same).

>>> vleff.apply_vpt(model, num_tokens=10)   # ViT-B/16: 12·10·768 = 92,160 trainable prompt values
>>> vleff.remove_vpt(model)                 # the original model, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TowerAdapter
from vleff.checks import check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.prompts import (
    PromptModule,
    attach_prompts,
    detach_prompts,
    prompt_modules,
    token_bound,
    token_keys_values,
)
from vleff.tokens.common import hooks_named

HOOK_NAME = "vpt"
MODULE_NAME = "vleff_vpt"
TOWERS = ("image", "text")


@dataclass
class VPTConfig(MethodConfig):
    """VPT-deep's settings.

    Attributes:
        num_tokens: prompt tokens per block (``N``; the reference config's 5).
        dropout: dropout on the prompt tokens in training (the reference's 0.0).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "vpt"
    num_tokens: int = 5
    dropout: float = 0.0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.num_tokens = check_int("num_tokens", self.num_tokens, low=1)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_towers(self.towers, TOWERS)


class VPTPrompts(PromptModule):
    """``prompts`` ``[depth, N, C]``: block ``i``'s prompt tokens, in the tower's token width."""

    def __init__(self, depth: int, num_tokens: int, width: int, bound: float, dropout: float) -> None:
        super().__init__(dropout)
        self.prompts = nn.Parameter(torch.empty(depth, num_tokens, width))
        nn.init.uniform_(self.prompts, -bound, bound)

    def prefix(
        self, adapter: TowerAdapter, info: BlockInfo, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        tokens = self.source(self.prompts[info.index], h.shape[0])
        return token_keys_values(adapter, info.block, tokens)


def apply_vpt(model: nn.Module, config: VPTConfig | None = None, **settings: Any) -> nn.Module:
    """Add ``num_tokens`` learned prompt tokens per block to every tower ``towers`` names (in
    place), freeze the backbone (a timm head stays trainable); applying again replaces the prompts
    (drawn anew). :func:`remove_vpt` undoes it exactly.

    Raises:
        TypeError: no supported tower.
        ValueError: a conflicting method is applied.
    """
    cfg = VPTConfig.build(config, **settings)

    def make(tower: TowerAdapter) -> VPTPrompts:
        return VPTPrompts(len(tower.blocks()), cfg.num_tokens, tower.embed_dim, token_bound(tower), cfg.dropout)

    return attach_prompts(model, HOOK_NAME, MODULE_NAME, cfg, make, refuse_applied_conflicts)


def remove_vpt(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_vpt`: no hooks, no ``vleff_vpt`` module, the ``requires_grad`` flags as before."""
    return detach_prompts(model, HOOK_NAME, MODULE_NAME)


def vpt_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def vpt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prompts VPT adds, over every tower."""
    return [p for m in prompt_modules(model, MODULE_NAME) for p in m.parameters()]


def vpt_num_parameters(depth: int, num_tokens: int, width: int) -> int:
    """Parameters VPT-deep adds to one tower: ``depth · N · C``."""
    return depth * num_tokens * width
