"""Turbo: informativity-driven token merging (Ju et al., ECCV 2024), training-free.

Turbo is ToMe plus one term (official code: ``anakin-skywalker-Joseph/Folder``, ``BLIP_turbo/turbo``).
Per block, after the attention residual: the metric is the keys averaged over heads, tokens split
alternately into sources (even) and destinations (odd), cosine similarities ``S``. A source's
*information degree* is its mutual redundancy minus its semantic value,

    E_i = max_j S_ij − β^|γ−l| · α · 30 · a_i,

where ``a_i`` is the class token's attention to token ``i`` (post-softmax with proportional
attention, averaged over heads) and ``l`` the block index. The ``r`` sources with the largest
``E_i`` merge, each into its most similar destination, with ToMe's size-weighted average and size
bookkeeping; a block whose sequence is shorter than ``r_threshold`` merges nothing. Only the
source side's semantic value is subtracted, so where a source goes is ToMe's choice and *which*
sources go is Turbo's: redundant **and** unimportant tokens. ``alpha=0`` is ToMe exactly.

vleff runs it through the merging hook ToMe runs on (:class:`vleff.tokens.merging.MergeHook`, whose
``source_penalty`` and ``merges_at`` seams it fills): the same matching kernels, merge plans,
token fields, text-tower rules and replay under checkpointing. Image towers read the class token's
row; text towers (not in the official release, which merges only BLIP's image tokens) read the
protected token's row (CLIP's EOT, BLIP's first token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter
from vleff.backbones.text import refuse_causal_decoder_towers
from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers
from vleff.tokens.merging import MergeHook, check_r, plain_r

HOOK_NAME = "turbo"
TOWERS = ("image", "text")
#: the official code's fixed factor on the semantic value (``30 * alpha * cls_attn``)
SEMANTIC_SCALE = 30.0


@dataclass
class TurboConfig(MethodConfig):
    """Turbo's settings (defaults: the official captioning/retrieval scripts, ``r`` as ToMe's).

    Attributes:
        r: tokens merged per block, as ToMe's ``r`` (an int, a per-block list or a ramp).
        alpha: weight of the semantic value (official scripts: 5; 0 is ToMe).
        beta, gamma: the layer factor ``β^|γ−l|`` (official: β = 1, γ = 0, so the factor is 1).
        r_threshold: a block whose sequence is shorter than this merges nothing (official: 40).
        prop_attn, trace_source, towers: as ToMe's.
    """

    method = "turbo"
    r: Any = 16
    alpha: float = 5.0
    beta: float = 1.0
    gamma: float = 0.0
    r_threshold: int = 40
    prop_attn: bool = True
    trace_source: bool = False
    towers: str = "image"

    def __post_init__(self) -> None:
        self.r = check_r(plain_r(self.r))
        self.alpha = check_number("alpha", self.alpha, low=0, owner="Turbo")
        self.beta = check_number("beta", self.beta, low=0, low_open=True, owner="Turbo")
        self.gamma = check_number("gamma", self.gamma, low=0, owner="Turbo")
        self.r_threshold = check_int("r_threshold", self.r_threshold, low=0)
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)
        check_towers(self.towers, TOWERS)


class TurboHook(MergeHook):
    """The merging hook with Turbo's source ranking and early stop."""

    name = HOOK_NAME
    label = "Turbo"
    replayable = True

    def __init__(self, config: TurboConfig, depth: int, query: int | str) -> None:
        super().__init__(config, depth)
        self.query = query  # the token whose attention is the semantic value: cls (0) or "eot"

    def attention_rows(self, index: int) -> tuple[int | str, ...]:
        return (self.query,) if self.config.alpha > 0 and self.r_per_block[index] > 0 else ()

    def merges_at(self, x: torch.Tensor, info: BlockInfo) -> int:
        return 0 if x.shape[1] < self.config.r_threshold else super().merges_at(x, info)

    def source_penalty(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor | None:
        cfg = self.config
        if cfg.alpha == 0:
            return None
        weight = cfg.beta ** abs(cfg.gamma - info.index) * cfg.alpha * SEMANTIC_SCALE
        return weight * info.row_attention(self.query)


def _query(tower: TowerAdapter) -> int | str:
    if tower.modality == "text":
        return "eot"
    if tower.num_prefix_tokens < 1:
        raise TypeError(
            f"Turbo on {tower.describe()}: its semantic value is the class token's attention, and this tower "
            "has no class token; use ToMe (vleff.apply_tome) on it"
        )
    return 0


def apply_turbo(model: nn.Module, config: TurboConfig | None = None, **settings: Any) -> nn.Module:
    """Turbo on every tower of ``model`` that ``towers`` names (in place); applying twice replaces
    the earlier settings. Raises ``TypeError`` for an image tower without a class token and
    ``ValueError`` for a bad setting or a causal decoder (as ToMe)."""
    cfg = TurboConfig.build(config, **settings)
    towers = select_towers(model, cfg.towers)
    refuse_causal_decoder_towers(model, towers, "Turbo", f"towers={cfg.towers!r}")
    queries = {id(t.root): _query(t) for t in towers}  # every tower checked before any changes
    if hooks_named(model, HOOK_NAME):
        remove_turbo(model)
    install_hooks(model, lambda tower: TurboHook(cfg, len(tower.blocks()), queries[id(tower.root)]), cfg.towers)
    return model


def remove_turbo(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_turbo`: the towers run the library's own forward again."""
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"Turbo is not applied to this {type(model).__name__}; nothing to remove")
    return model


def update_turbo(model: nn.Module, **changes: Any) -> None:
    """Change settings of an applied Turbo (no re-patching); ``towers`` cannot change."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"Turbo is not applied to this {type(model).__name__}; call apply_turbo first")
    new = hooks[0].config.replace(**changes)
    if new.towers != hooks[0].config.towers:
        raise ValueError(f"towers cannot change on an applied Turbo ({hooks[0].config.towers!r} -> {new.towers!r})")
    for hook in hooks:
        hook.configure(new)


def turbo_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))
