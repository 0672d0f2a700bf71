"""Token merging (ToMe, Bolya et al., ICLR 2023) on every supported tower.

Between the attention and the MLP of each block, ``r`` tokens are merged into their most
similar partners by bipartite soft matching on the attention keys (averaged over heads),
with size-weighted averages; proportional attention adds ``log(size)`` to the attention
logits so a merged token counts as many tokens. See :mod:`vleff.kernels.tome` for the
matching itself.

Text towers (``towers="text"``/``"all"``): a causal *encoder* pooled at its EOT (CLIP) is
merged, its EOT kept apart and pooled as usual (:mod:`vleff.backbones.text`); a causal
*decoder* (BLIP's ``text_decoder``, a prediction at every position) is refused, at apply time
and when a tower runs as one: the matching is decided on the whole sequence and a merged token
holds several positions, so outputs at earlier positions would depend on later tokens.

>>> vleff.apply_tome(model, r=16)             # 16 tokens fewer per block
>>> vleff.apply_tome(model, r=(16, 0.5))      # linear ramp over depth, mean 16
>>> vleff.update(model, "tome", r=8)          # re-schedule without re-applying
>>> vleff.remove_tome(model)                  # the original forward, exactly
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.backbones import TowerAdapter
from vleff.backbones.text import refuse_causal_decoder_towers
from vleff.checks import check_bool, check_towers
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers
from vleff.tokens.merging import MergeHook, check_r, plain_r

# the r specification lives in the merging layer ToMe and its variants share; these names stay
# importable from here (and from the old path ``vleff.tokens.tome``)
from vleff.tokens.merging import RSpec as RSpec
from vleff.tokens.merging import effective_r as effective_r
from vleff.tokens.merging import parse_r as parse_r
from vleff.tokens.merging import r_per_block as r_per_block

HOOK_NAME = "tome"


@dataclass
class ToMeConfig(MethodConfig):
    """ToMe's settings.

    Attributes:
        r: tokens merged per block: an int, a per-block list, or an ``(r, inflection)`` ramp
            (see :func:`parse_r`); capped per block at what that block can merge.
        prop_attn: proportional attention (``+log size`` on the attention logits; recommended
            off the shelf, optional in training).
        trace_source: keep the source map (which input tokens each token holds) as the token
            field ``"source"``, for visualisation; costs ``B·N²`` memory.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "tome"
    r: Any = 16
    prop_attn: bool = True
    trace_source: bool = False
    towers: str = "image"

    def __post_init__(self) -> None:
        check_bool("prop_attn", self.prop_attn)
        check_bool("trace_source", self.trace_source)
        check_towers(self.towers, TOWERS)
        self.r = check_r(plain_r(self.r))  # validated here, once; hooks only expand it per tower


TOWERS = ("image", "text")


class ToMeHook(MergeHook):
    """The token-merging hook of one tower (ToMe's ranking: each source's best similarity)."""

    name = HOOK_NAME
    label = "ToMe"


def apply_tome(model: nn.Module, config: ToMeConfig | None = None, **settings: Any) -> nn.Module:
    """Merge tokens in every tower of ``model`` that ``towers`` names (in place).

    Args:
        model: any model holding a supported tower (timm ViT/DeiT, open_clip CLIP,
            Hugging Face CLIP/BLIP, or a LightningModule wrapping one).
        config: a :class:`ToMeConfig`; ``settings`` (``r=8``, ``prop_attn=False`` ...) build
            or update it.

    Raises:
        ValueError: a bad setting, or ``towers`` naming a text tower ``model`` runs as a causal
            decoder (see the module docstring).

    Returns:
        ``model``, for chaining. Applying twice replaces the earlier settings.
    """
    cfg = ToMeConfig.build(config, **settings)
    refuse_causal_decoder_towers(model, select_towers(model, cfg.towers), "ToMe", f"towers={cfg.towers!r}")
    if hooks_named(model, HOOK_NAME):
        remove_tome(model)

    def make_hook(tower: TowerAdapter) -> ToMeHook:
        if tower.pooling == "avg":
            warnings.warn(
                f"{tower.describe()} average-pools its tokens; after merging the average is over "
                "merged tokens (not weighted by size)",
                stacklevel=3,
            )
        return ToMeHook(cfg, len(tower.blocks()))

    install_hooks(model, make_hook, cfg.towers)
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: the towers run the library's own forward again."""
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; nothing to remove")
    return model


def update_tome(model: nn.Module, **changes: Any) -> None:
    """Change settings of an applied ToMe (schedules; no re-patching). ``towers`` cannot change."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; call apply_tome first")
    new = hooks[0].config.replace(**changes)
    if new.towers != hooks[0].config.towers:
        raise ValueError(
            f"towers cannot change on an applied ToMe ({hooks[0].config.towers!r} -> {new.towers!r}); apply it again"
        )
    for hook in hooks:
        hook.configure(new)


def update_tome_per_tower(model: nn.Module, r_for_depth: Callable[[int], list[int]]) -> list[list[int]]:
    """Set each ToMe tower's r per block to ``r_for_depth(its depth)``; returns them, tower by tower.

    Schedules (the callback's and the mixin's warm-up) go through this rather than
    ``update_tome(r=list)``: one list would be read against every tower, so a deeper tower
    (ViT-L/14's 24 image blocks beside CLIP's 12 text blocks) would stop merging where the
    shallower one ends, and a longer list would not fit the shallower one at all.
    """
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; call apply_tome first")
    out = []
    for hook in hooks:
        r = list(r_for_depth(hook.depth))
        if r != hook.r_per_block:
            hook.set_r_per_block(r)
        out.append(list(hook.r_per_block))
    return out


def set_tome_progress(model: nn.Module, progress: float) -> list[list[int]]:
    """Run every ToMe tower of ``model`` at ``progress`` (0 to 1) of its configured r, each tower
    from its own depth; returns the r per block, tower by tower."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; call apply_tome first")
    for hook in hooks:
        hook.set_progress(progress)
    return [list(hook.r_per_block) for hook in hooks]


def tome_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def tome_r(model: nn.Module) -> list[int]:
    """The r per block of the first ToMe-patched tower."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}")
    return list(hooks[0].r_per_block)
