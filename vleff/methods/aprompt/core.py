"""APrompt (Wang et al., EMNLP 2023): attention prompts — learned keys and values inside every
block's attention, on top of input prompts.

The paper's code could not be read (METHODS-next: no repository found), so vleff follows the
closest released code, the same group's vision method E2VPT (``ChengHan111/E2VPT``,
``src/models/vit_backbones/vit_changeVK.py: Attention``), read for facts only:

* **key/value prompts**: per block and head, ``kv_tokens`` learned key vectors and as many value
  vectors (``[H, P, Dh]`` each, no projection, no norm), concatenated to the block's own keys and
  values; every query sees them (E2VPT appends them; with no mask in a vision tower the order does
  not matter, and on text towers the block writes its causal and padding masks over the tokens
  only). Init uniform ``±√(6 / (3·p·p + 16))`` (E2VPT's formula with its literal ``16``, p the patch
  side: ±0.0875 on ViT-B/16); text towers (not in the reference) ``±√(6 / (C + C))``. Dropout on the
  prompts (per sample, as E2VPT's dropout on the batch-expanded prompts);
* **input prompts**: ``num_tokens`` VPT-deep prompt tokens per block (E2VPT's visual prompts, VPT's
  init ±√(6 / (3·p·p + C))), through the same seam as :mod:`vleff.methods.vpt`: the keys and values
  the block computes for them (``num_tokens=0``: attention prompts only);
* **query prompts** (the abstract's third kind) are not built: their mechanics are in neither the
  abstract nor E2VPT's default path (its query-prompt modes are ablations), so vleff does not guess.

Defaults (vleff's choice, no released APrompt config read): 10 key/value and 10 input prompts per
block, dropout 0. Trained: the prompts (and a timm head); the backbone is frozen and, under the
callback, kept in eval mode.

>>> vleff.apply_aprompt(model, kv_tokens=10, num_tokens=0)   # ViT-B/16: 2·10·768·12 = 184,320
>>> vleff.remove_aprompt(model)
"""

from __future__ import annotations

import math
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
    head_split,
    patch_fan_in,
    prompt_modules,
    token_bound,
    token_keys_values,
    uniform_bound,
)
from vleff.tokens.common import hooks_named

HOOK_NAME = "aprompt"
MODULE_NAME = "vleff_aprompt"
TOWERS = ("image", "text")
#: the constant E2VPT adds to ``3·p·p`` in its key/value prompts' uniform bound
E2VPT_FAN_OUT = 16


@dataclass
class APromptConfig(MethodConfig):
    """APrompt's settings.

    Attributes:
        kv_tokens: key/value prompts per block (each head gets that many keys and values).
        num_tokens: input prompt tokens per block (VPT-deep style; 0: none).
        dropout: dropout on every prompt in training.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "aprompt"
    kv_tokens: int = 10
    num_tokens: int = 10
    dropout: float = 0.0
    towers: str = "image"

    def __post_init__(self) -> None:
        self.kv_tokens = check_int("kv_tokens", self.kv_tokens, low=1)
        self.num_tokens = check_int("num_tokens", self.num_tokens, low=0)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_towers(self.towers, TOWERS)


def kv_bound(tower: TowerAdapter) -> float:
    """E2VPT's key/value prompt bound ``√(6 / (3·p·p + 16))`` (``3·p·p`` = the patch embedding's
    fan-in); ``√(6 / (C + C))`` on a tower without a patch embedding."""
    fan_in = patch_fan_in(tower) if tower.modality == "image" else None
    if fan_in is None:
        return uniform_bound(tower.embed_dim, tower.embed_dim)
    return math.sqrt(6.0 / (fan_in + E2VPT_FAN_OUT))


class AttentionPrompts(PromptModule):
    """``keys``/``values`` ``[depth, P_kv, C]`` (heads split as the block splits its own), and the
    input prompts ``prompts`` ``[depth, N, C]`` when ``num_tokens > 0``."""

    def __init__(
        self, depth: int, kv_tokens: int, num_tokens: int, width: int, bounds: tuple[float, float], dropout: float
    ) -> None:
        super().__init__(dropout)
        kv, tokens = bounds
        self.keys = nn.Parameter(torch.empty(depth, kv_tokens, width).uniform_(-kv, kv))
        self.values = nn.Parameter(torch.empty(depth, kv_tokens, width).uniform_(-kv, kv))
        self.prompts = None
        if num_tokens:
            self.prompts = nn.Parameter(torch.empty(depth, num_tokens, width).uniform_(-tokens, tokens))

    def prefix(
        self, adapter: TowerAdapter, info: BlockInfo, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        batch, block = h.shape[0], info.block
        keys = head_split(adapter, block, self.source(self.keys[info.index], batch))
        values = head_split(adapter, block, self.source(self.values[info.index], batch))
        if self.prompts is None:
            return keys, values
        pk, pv = token_keys_values(adapter, block, self.source(self.prompts[info.index], batch))
        n = max(keys.shape[0], pk.shape[0])
        keys = torch.cat([keys.expand(n, -1, -1, -1), pk.to(keys.dtype).expand(n, -1, -1, -1)], dim=2)
        values = torch.cat([values.expand(n, -1, -1, -1), pv.to(values.dtype).expand(n, -1, -1, -1)], dim=2)
        return keys, values


def apply_aprompt(model: nn.Module, config: APromptConfig | None = None, **settings: Any) -> nn.Module:
    """Add key/value prompts (and input prompts) to every block's attention of the towers ``towers``
    names (in place), freeze the backbone (a timm head stays trainable); applying again replaces them
    (drawn anew). :func:`remove_aprompt` undoes it exactly.

    Raises:
        TypeError: no supported tower.
        ValueError: a conflicting method is applied.
    """
    cfg = APromptConfig.build(config, **settings)

    def make(tower: TowerAdapter) -> AttentionPrompts:
        bounds = (kv_bound(tower), token_bound(tower))
        depth, width = len(tower.blocks()), tower.embed_dim
        return AttentionPrompts(depth, cfg.kv_tokens, cfg.num_tokens, width, bounds, cfg.dropout)

    return attach_prompts(model, HOOK_NAME, MODULE_NAME, cfg, make, refuse_applied_conflicts)


def remove_aprompt(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_aprompt`: no hooks, no ``vleff_aprompt`` module, the flags as before."""
    return detach_prompts(model, HOOK_NAME, MODULE_NAME)


def aprompt_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def aprompt_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The prompts APrompt adds, over every tower."""
    return [p for m in prompt_modules(model, MODULE_NAME) for p in m.parameters()]


def aprompt_num_parameters(depth: int, kv_tokens: int, num_tokens: int, width: int) -> int:
    """Parameters APrompt adds to one tower: ``2·L·P_kv·C`` key/value prompts + ``L·N·C`` input prompts."""
    return depth * width * (2 * kv_tokens + num_tokens)
