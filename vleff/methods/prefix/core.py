"""Prefix-tuning / P-tuning v2 (Li & Liang, ACL 2021; Liu et al., ACL 2022): per block, ``P`` learned
keys and values in front of the self-attention's own.

As P-tuning v2's official code (THUDM/P-tuning-v2 ``PrefixEncoder``, ``get_prompt``) by default: one
table ``[P, 2·L·C]`` (its ``Embedding(pre_seq_len, 2·L·d)``), row ``j`` holding prefix position
``j``'s key and value of every layer in the order ``k_0, v_0, k_1, v_1, ...``, initialised ``N(0,
0.02²)`` (Hugging Face's ``_init_weights`` of a missing embedding, as METHODS-next reads it; not
checked), no reparameterisation, dropout 0.1 on the prefixes (per sample), the backbone frozen and
the head trained; ``P`` = 4 (its argument default). The keys and values are in the attention's own
space (after the projections, before the heads split), so they need no norm and no projection.

``projection=h`` gives Li & Liang's reparameterisation instead: ``Embedding(P, C) → Linear(C, h) →
Tanh → Linear(h, 2·L·C)`` (their ``h`` = 512), trained as a whole (its output is what the model
uses). Block ``i`` computes only its own ``2·C`` output rows of the last layer.

Every query sees the prefix: text towers keep their causal mask over the tokens and their padding
mask (the block writes both out over the tokens only); BLIP's text layers get it on their
self-attention only (cross-attention keys are the image's).

>>> vleff.apply_prefix(model, num_tokens=10)   # ViT-B/16: 2·10·768·12 = 184,320 trainable values
>>> vleff.remove_prefix(model)                 # the original model, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import BlockInfo, TowerAdapter
from vleff.checks import check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.prompts import PromptModule, attach_prompts, detach_prompts, head_split, prompt_modules
from vleff.tokens.common import hooks_named

HOOK_NAME = "prefix"
MODULE_NAME = "vleff_prefix"
TOWERS = ("image", "text")
#: P-tuning v2's (Hugging Face's) initialiser range for the prefix table
INIT_STD = 0.02


@dataclass
class PrefixConfig(MethodConfig):
    """Prefix-tuning's settings.

    Attributes:
        num_tokens: prefix length ``P`` (P-tuning v2's ``pre_seq_len`` default, 4).
        dropout: dropout on the prefix keys/values in training (P-tuning v2's 0.1).
        projection: 0 for P-tuning v2's direct table (default); ``h > 0`` for Li & Liang's
            reparameterisation through a ``C → h → 2·L·C`` MLP (they use 512).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "prefix"
    num_tokens: int = 4
    dropout: float = 0.1
    projection: int = 0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.num_tokens = check_int("num_tokens", self.num_tokens, low=1)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.projection = check_int("projection", self.projection, low=0)
        check_towers(self.towers, TOWERS)


class PrefixTable(PromptModule):
    """The prefix keys/values of one tower: ``table`` ``[P, 2·L·C]`` (direct), or ``embedding``
    ``[P, C]`` and the MLP ``mlp_in``/``mlp_out`` (``projection > 0``)."""

    def __init__(self, depth: int, num_tokens: int, width: int, projection: int, dropout: float) -> None:
        super().__init__(dropout)
        self.width = width
        if projection == 0:
            self.table = nn.Parameter(torch.empty(num_tokens, 2 * depth * width).normal_(0.0, INIT_STD))
        else:
            self.embedding = nn.Parameter(torch.empty(num_tokens, width).normal_(0.0, INIT_STD))
            self.mlp_in = nn.Linear(width, projection)
            self.mlp_out = nn.Linear(projection, 2 * depth * width)
            for layer in (self.mlp_in, self.mlp_out):
                nn.init.normal_(layer.weight, 0.0, INIT_STD)
                nn.init.zeros_(layer.bias)

    def rows(self, index: int) -> torch.Tensor:
        """``[P, 2·C]``: block ``index``'s keys then values, one row per prefix position."""
        span = slice(2 * index * self.width, 2 * (index + 1) * self.width)
        if "table" in self._parameters:
            return self.table[:, span]
        hidden = torch.tanh(self.mlp_in(self.embedding))
        return F.linear(hidden, self.mlp_out.weight[span], self.mlp_out.bias[span])

    def prefix(
        self, adapter: TowerAdapter, info: BlockInfo, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        kv = self.source(self.rows(info.index), h.shape[0])  # [1 or B, P, 2C]
        return head_split(adapter, info.block, kv[..., : self.width]), head_split(
            adapter, info.block, kv[..., self.width :]
        )


def apply_prefix(model: nn.Module, config: PrefixConfig | None = None, **settings: Any) -> nn.Module:
    """Add ``num_tokens`` learned keys and values in front of every block's self-attention of the
    towers ``towers`` names (in place), freeze the backbone (a timm head stays trainable); applying
    again replaces the prefixes (drawn anew). :func:`remove_prefix` undoes it exactly.

    Raises:
        TypeError: no supported tower.
        ValueError: a conflicting method is applied.
    """
    cfg = PrefixConfig.build(config, **settings)

    def make(tower: TowerAdapter) -> PrefixTable:
        return PrefixTable(len(tower.blocks()), cfg.num_tokens, tower.embed_dim, cfg.projection, cfg.dropout)

    return attach_prompts(model, HOOK_NAME, MODULE_NAME, cfg, make, refuse_applied_conflicts)


def remove_prefix(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_prefix`: no hooks, no ``vleff_prefix`` module, the ``requires_grad`` flags as before."""
    return detach_prompts(model, HOOK_NAME, MODULE_NAME)


def prefix_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def prefix_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters prefix-tuning adds, over every tower."""
    return [p for m in prompt_modules(model, MODULE_NAME) for p in m.parameters()]


def prefix_num_parameters(depth: int, num_tokens: int, width: int, projection: int = 0) -> int:
    """Parameters prefix-tuning adds to one tower: ``2·L·P·C`` (direct), or with Li & Liang's MLP
    ``P·C + (C·h + h) + (h·2LC + 2LC)``."""
    out = 2 * depth * width
    if projection == 0:
        return num_tokens * out
    return num_tokens * width + (width * projection + projection) + (projection * out + out)
