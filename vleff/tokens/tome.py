"""Token merging (ToMe, Bolya et al., ICLR 2023) on every supported image tower.

Between the attention and the MLP of each block, ``r`` tokens are merged into their most
similar partners by bipartite soft matching on the attention keys (averaged over heads),
with size-weighted averages; proportional attention adds ``log(size)`` to the attention
logits so a merged token counts as many tokens. See :mod:`vleff.kernels.tome` for the
matching itself.

>>> vleff.apply_tome(model, r=16)          # 16 tokens fewer per block
>>> vleff.apply_tome(model, r=(16, 0.5))   # linear ramp over depth, mean 16
>>> vleff.set_tome_r(model, 8)             # re-schedule without re-applying
>>> vleff.remove_tome(model)               # the original forward, exactly
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from typing import Sequence, Union

import torch
from torch import nn

from vleff.backbones import BlockInfo, Modality, TokenState, TowerAdapter, find_towers
from vleff.kernels.tome import bipartite_soft_matching, max_merge, merge_sum, merge_weighted
from vleff.registry import Method, register_method
from vleff.tokens.common import hooks_named, install_hook, remove_hook

HOOK_NAME = "tome"
RSpec = Union[int, Sequence[int], tuple[int, float], Mapping[str, float]]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_r(r: RSpec, depth: int) -> list[int]:
    """Turn an r specification into tokens to merge per block.

    * ``int``: the same r in every block.
    * ``list``: one r per block (shorter lists leave the remaining blocks unmerged).
    * ``(r, inflection)`` tuple: a linear ramp over depth whose mean is r; the first block
      merges ``r·(1 − inflection)`` and the last ``r·(1 + inflection)``, ``inflection`` in [-1, 1].
      A mapping ``{"r": 16, "inflection": 0.5}`` means the same (configs have no tuples).

    The per-block r is capped at run time at what that block can merge.
    """
    if isinstance(r, Mapping):
        if set(r) != {"r", "inflection"}:
            raise ValueError(f"r={dict(r)!r}: a mapping must have exactly the keys 'r' and 'inflection'")
        r = (r["r"], r["inflection"])
    if isinstance(r, tuple):
        if len(r) != 2 or not all(_is_number(v) for v in r):
            raise ValueError(f"r={r!r}: a tuple must be (r, inflection) with two numbers")
        base, inflection = r
        if base < 0 or not -1 <= inflection <= 1:
            raise ValueError(f"r={r!r}: need r >= 0 and inflection in [-1, 1]")
        if depth == 1:
            return [int(base)]
        first, last = base * (1 - inflection), base * (1 + inflection)
        return [int(round(first + (last - first) * i / (depth - 1))) for i in range(depth)]
    if isinstance(r, (list, torch.Tensor)) or (isinstance(r, Sequence) and not isinstance(r, str)):
        values = list(r.tolist() if isinstance(r, torch.Tensor) else r)
        if len(values) > depth:
            raise ValueError(f"r has {len(values)} entries but the tower has only {depth} blocks")
        for i, v in enumerate(values):
            if not _is_number(v) or v < 0 or int(v) != v:
                raise ValueError(f"r[{i}]={v!r} must be a non-negative integer")
        return [int(v) for v in values] + [0] * (depth - len(values))
    if not _is_number(r):
        raise ValueError(f"r={r!r} must be an int, a list of ints or an (r, inflection) tuple")
    if r < 0 or int(r) != r:
        raise ValueError(f"r={r!r} must be a non-negative integer")
    return [int(r)] * depth


def effective_r(r_per_block: Sequence[int], num_tokens: int, num_protected: int) -> list[int]:
    """The r each block really merges, given the tokens left (what ``between`` will do)."""
    out = []
    for r in r_per_block:
        r_eff = min(r, max_merge(num_tokens, num_protected))
        out.append(r_eff)
        num_tokens -= r_eff
    return out


class ToMeHook:
    """The token-merging :class:`~vleff.backbones.TokenHook` of one tower."""

    name = HOOK_NAME

    def __init__(self, r_per_block: list[int], trace_source: bool = False) -> None:
        self.r_per_block = r_per_block
        self.trace_source = trace_source

    def start(self, state: TokenState, x: torch.Tensor) -> None:
        if self.trace_source:
            n = x.shape[1]
            state.source = torch.eye(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n, n)

    def needs_cls_attention(self, index: int) -> bool:
        return False

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        r = self.r_per_block[info.index]
        if r <= 0:
            return x
        if state.keep is not None:
            raise RuntimeError("ToMe cannot merge tokens while a masking method (DynamicViT training) is active")
        plan = bipartite_soft_matching(info.keys.mean(dim=1), r, state.num_prefix)
        if plan.r == 0:
            return x
        x, state.size = merge_weighted(x, state.sizes_or_ones(x), plan)
        if state.source is not None:
            state.source = merge_sum(state.source, plan)
        return x


def apply_tome(model: nn.Module, r: RSpec = 16, prop_attn: bool = True, trace_source: bool = False,
               modality: Modality = "image") -> nn.Module:
    """Merge ``r`` tokens per block in every ``modality`` tower of ``model`` (in place).

    Args:
        model: any model holding a supported tower (timm ViT/DeiT, open_clip CLIP,
            Hugging Face CLIP/BLIP, or a LightningModule wrapping one).
        r: tokens to merge per block; see :func:`parse_r`.
        prop_attn: proportional attention (recommended off the shelf; optional in training).
        trace_source: keep the source map (which input patches each token holds) for
            visualisation; costs ``B·N²`` memory.
        modality: which towers to patch. Text towers are refused: their EOT pooling reads a
            fixed position.

    Returns:
        ``model``, for chaining. Applying twice replaces the earlier settings.
    """
    if modality != "image":
        raise ValueError(f"modality={modality!r}: ToMe merges image tokens only (text towers pool at a fixed EOT position)")
    if not isinstance(prop_attn, bool) or not isinstance(trace_source, bool):
        raise ValueError(f"prop_attn={prop_attn!r} and trace_source={trace_source!r} must be booleans")
    for tower in find_towers(model, modality):  # a bad r fails here, before an earlier ToMe is removed
        parse_r(r, len(tower.blocks()))
    if hooks_named(model, HOOK_NAME):
        remove_tome(model)

    def make_hook(tower: TowerAdapter) -> ToMeHook:
        if tower.pooling == "avg":
            warnings.warn(f"{tower.describe()} average-pools its tokens; after merging the average is over "
                          "merged tokens (not weighted by size)", stacklevel=3)
        return ToMeHook(parse_r(r, len(tower.blocks())), trace_source)

    install_hook(model, make_hook, modality, prop_attn=prop_attn)
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: the towers run the library's own forward again."""
    if remove_hook(model, HOOK_NAME) == 0:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; nothing to remove")
    return model


def set_tome_r(model: nn.Module, r: RSpec) -> None:
    """Change r of an applied ToMe (used by schedules; no re-patching)."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}; call apply_tome first")
    for hook in hooks:
        hook.r_per_block = parse_r(r, len(hook.r_per_block))


def tome_r(model: nn.Module) -> list[int]:
    """The r per block of the first ToMe-patched tower."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"ToMe is not applied to this {type(model).__name__}")
    return list(hooks[0].r_per_block)


def r_for_flops_ratio(num_tokens: int, depth: int, num_protected: int, target_ratio: float) -> int:
    """Smallest constant r whose token counts cut the token-linear work to ``target_ratio``.

    A quick planning aid (token-linear cost ~ sum of tokens over blocks; attention's quadratic
    term falls faster). Measure real FLOPs with :func:`vleff.profile.count_flops`.
    """
    if not 0 < target_ratio <= 1:
        raise ValueError(f"target_ratio={target_ratio} must be in (0, 1]")
    full = num_tokens * depth
    for r in range(0, math.ceil(num_tokens / 2) + 1):
        counts, n = [], num_tokens
        for r_eff in effective_r([r] * depth, num_tokens, num_protected):
            counts.append(n)
            n -= r_eff
        if sum(counts) / full <= target_ratio:
            return r
    return max_merge(num_tokens, num_protected)


register_method(Method(name="tome", apply=apply_tome, remove=remove_tome, defaults={"r": 16},
                       kind="tokens", description="ToMe token merging (bipartite soft matching)"))
