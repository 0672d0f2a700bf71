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

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter, TowerHook
from vleff.backbones.text import (
    PAD,
    PROTECTED,
    refuse_causal_decoder,
    refuse_causal_decoder_towers,
)
from vleff.checks import check_bool, check_towers
from vleff.kernels.tome import bipartite_soft_matching, max_merge, merge_weighted
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers

HOOK_NAME = "tome"
RSpec = int | Sequence[int] | tuple[int, float] | Mapping[str, float]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_r(r: RSpec) -> RSpec:
    """Validate an r specification without a tower (the config's job, once); returns it.

    * ``int``: the same r in every block.
    * ``list``: one r per block (shorter lists leave the remaining blocks unmerged; a list longer
      than a tower's depth is refused when applied to that tower).
    * ``(r, inflection)`` tuple: a linear ramp over depth whose mean is r; the first block
      merges ``r·(1 − inflection)`` and the last ``r·(1 + inflection)``, ``inflection`` in [-1, 1].
      A mapping ``{"r": 16, "inflection": 0.5}`` means the same (configs have no tuples).
    """
    if isinstance(r, Mapping):
        if set(r) != {"r", "inflection"}:
            raise ValueError(f"r={dict(r)!r}: a mapping must have exactly the keys 'r' and 'inflection'")
        _check_ramp((r["r"], r["inflection"]))
        return r
    if isinstance(r, tuple):
        _check_ramp(r)
        return r
    if isinstance(r, (list, torch.Tensor)) or (isinstance(r, Sequence) and not isinstance(r, str)):
        values = list(r.tolist() if isinstance(r, torch.Tensor) else r)
        for i, v in enumerate(values):
            if not _is_number(v) or v < 0 or int(v) != v:
                raise ValueError(f"r[{i}]={v!r} must be a non-negative integer")
        return r
    if not _is_number(r):
        raise ValueError(f"r={r!r} must be an int, a list of ints or an (r, inflection) tuple")
    if r < 0 or int(r) != r:
        raise ValueError(f"r={r!r} must be a non-negative integer")
    return r


def _check_ramp(r: tuple) -> None:
    if len(r) != 2 or not all(_is_number(v) for v in r):
        raise ValueError(f"r={r!r}: a tuple must be (r, inflection) with two numbers")
    base, inflection = r
    if base < 0 or not -1 <= inflection <= 1:
        raise ValueError(f"r={r!r}: need r >= 0 and inflection in [-1, 1]")


def r_per_block(r: RSpec, depth: int) -> list[int]:
    """The tokens to merge in each of a tower's ``depth`` blocks for a *checked* specification
    (:func:`check_r`); the only error left is a list longer than the tower. The per-block r is
    capped at run time at what that block can merge."""
    if isinstance(r, Mapping):
        r = (r["r"], r["inflection"])
    if isinstance(r, tuple):
        base, inflection = r
        if depth == 1:
            return [int(base)]
        first, last = base * (1 - inflection), base * (1 + inflection)
        return [round(first + (last - first) * i / (depth - 1)) for i in range(depth)]
    if isinstance(r, (list, torch.Tensor)) or (isinstance(r, Sequence) and not isinstance(r, str)):
        values = list(r.tolist() if isinstance(r, torch.Tensor) else r)
        if len(values) > depth:
            raise ValueError(f"r has {len(values)} entries but the tower has only {depth} blocks")
        return [int(v) for v in values] + [0] * (depth - len(values))
    return [int(r)] * depth


def parse_r(r: RSpec, depth: int) -> list[int]:
    """:func:`check_r` then :func:`r_per_block`, for a specification that was not checked yet."""
    return r_per_block(check_r(r), depth)


def effective_r(r_per_block: Sequence[int], num_tokens: int, num_protected: int) -> list[int]:
    """The r each block really merges, given the tokens left (what ``between`` will do)."""
    out = []
    for r in r_per_block:
        r_eff = min(r, max_merge(num_tokens, num_protected))
        out.append(r_eff)
        num_tokens -= r_eff
    return out


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


def plain_r(r: RSpec) -> RSpec:
    """``r`` as plain Python values (an OmegaConf list or dict from a Hydra config becomes a
    ``list`` or ``dict``), so that it pickles into checkpoints ``torch.load(weights_only=True)`` reads."""
    if isinstance(r, torch.Tensor):
        raise ValueError(  # noqa: TRY004 (a bad setting value; the config contract raises ValueError)
            f"r={r!r} is not allowed; pass a Python int, list or (r, inflection) tuple, not a tensor"
        )
    if isinstance(r, (str, bytes, tuple)):
        return r
    if isinstance(r, Mapping):
        return dict(r)
    if isinstance(r, Sequence):
        return list(r)
    return r


class ToMeHook(TowerHook):
    """The token-merging hook of one tower."""

    name = HOOK_NAME
    #: how messages name the method (a variant built on this hook names itself)
    label = "ToMe"
    #: a pure function of the block input and the token state it started from: replays exactly
    replayable = True

    def __init__(self, config: ToMeConfig, depth: int) -> None:
        self.config = config
        self.depth = depth
        self.r_per_block = r_per_block(config.r, depth)

    def configure(self, config: ToMeConfig) -> None:
        self.r_per_block = r_per_block(config.r, self.depth)
        self.config = config

    def set_progress(self, progress: float) -> None:
        """Run this tower at ``progress`` (0 to 1) of its configured r, block by block (a schedule's
        warm-up hands every tower the same progress; each scales its own per-block r)."""
        if not 0 <= progress <= 1:
            raise ValueError(f"progress={progress!r} must be in [0, 1]")
        self.r_per_block = [round(r * progress) for r in r_per_block(self.config.r, self.depth)]

    def set_r_per_block(self, values: Sequence[int]) -> None:
        """Run this tower at ``values`` (one entry per block)."""
        values = list(values)
        if len(values) != self.depth:
            raise ValueError(f"r_per_block has {len(values)} entries; this tower has {self.depth} blocks")
        self.r_per_block = parse_r(values, self.depth)

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        if self.config.trace_source:
            n = x.shape[1]
            state.register("source", torch.eye(n, device=x.device, dtype=torch.float32).expand(x.shape[0], n, n), "sum")
        return x

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        size = state.size
        if not self.config.prop_attn or size is None:
            return None
        return size[..., 0].log().to(dtype)[:, None, None, :]

    def source_penalty(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor | None:
        """``[B, N]`` subtracted from each token's best similarity before the merges are ranked
        (``None``: ToMe's ranking). The seam a ToMe variant overrides to choose *which* tokens merge
        (Turbo: their semantic value) with ToMe's matching, merge and bookkeeping unchanged."""
        return None

    def merges_at(self, x: torch.Tensor, info: BlockInfo) -> int:
        """Tokens to merge in this block (the schedule's r; a variant may stop early)."""
        return self.r_per_block[info.index]

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        r = self.merges_at(x, info)
        if r <= 0:
            return x
        if state.get("keep") is not None:
            raise RuntimeError(
                f"{self.label} cannot merge tokens while a masking method (DynamicViT training) is active"
            )
        refuse_causal_decoder(state, self.label)
        # text towers: the EOT is protected and padding merges only with padding
        plan = bipartite_soft_matching(
            info.keys.mean(dim=1),
            r,
            state.num_prefix,
            protected=state.get(PROTECTED),
            groups=state.get(PAD),
            source_penalty=self.source_penalty(x, info, state),
        )
        if plan.r == 0:
            return x
        x, size = merge_weighted(x, state.sizes(x), plan)
        state.merge(plan, merged_size=size)
        return x


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
