"""Token merging shared by the merging methods (ToMe, Turbo): the ``r`` specification (per
block, ramps over depth) and the tower hook that merges.

A merging method is its config (which must carry ``r``, ``prop_attn`` and ``trace_source``) and a
subclass of :class:`MergeHook`; the matching and the merge are :mod:`vleff.kernels.tome`, the
size and source bookkeeping the token state's (:class:`vleff.backbones.TokenState`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vleff.backbones import BlockInfo, TokenState, TowerHook
from vleff.backbones.text import PAD, PROTECTED, refuse_causal_decoder
from vleff.kernels.tome import bipartite_soft_matching, max_merge, merge_weighted

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


class MergeHook(TowerHook):
    """Bipartite token merging in one tower, between attention and MLP: ``r_per_block`` tokens
    merged per block by the matching on the attention keys (averaged over heads), size-weighted
    averages, proportional attention (``+log size``) and the source map, on every family and
    text tower the token state supports. Subclasses set ``name`` and ``label`` and may override
    two seams: :meth:`source_penalty` (*which* tokens merge) and :meth:`merges_at` (how many).

    ``config`` is the method's config: it must have ``r`` (a checked :data:`RSpec`),
    ``prop_attn`` and ``trace_source``.
    """

    name = ""
    #: how messages name the method
    label = ""
    #: a pure function of the block input and the token state it started from: replays exactly
    replayable = True

    def __init__(self, config: Any, depth: int) -> None:
        self.config = config
        self.depth = depth
        self.r_per_block = r_per_block(config.r, depth)

    def configure(self, config: Any) -> None:
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


# --- the FLOPs knob of the merging methods (vleff.fit_budget) ----------------------------------------
#: merges per block a budget search may ask for at most (a block merges at most half its tokens;
#: 512 covers 1024-token towers, and the hook caps each block at what it can merge)
MAX_BUDGET_MERGES_PER_BLOCK = 512


def _budget_depth(model: Any, hook_name: str) -> int:
    from vleff.tokens.common import hooks_named

    hooks = hooks_named(model, hook_name)
    if not hooks:
        raise ValueError(f"{hook_name} is not applied to this {type(model).__name__}")
    return min(h.depth for h in hooks)


def budget_levels(model: Any, hook_name: str) -> int:
    """The merging methods' FLOPs knob counts merges in the whole tower (levels ``0..this``)."""
    return _budget_depth(model, hook_name) * MAX_BUDGET_MERGES_PER_BLOCK


def budget_settings(model: Any, level: float, hook_name: str) -> dict[str, Any]:
    """``level`` merges spread over the blocks, one more in the first ``level mod depth`` blocks
    (front-loaded: every extra merge lowers the FLOPs, and by about one token's cost in the
    later blocks, so the knob has fine steps). A list as long as the shallowest tower (a deeper
    tower leaves its remaining blocks unmerged)."""
    return {"r": spread_merges(int(level), _budget_depth(model, hook_name))}


def spread_merges(merges: int, depth: int) -> list[int]:
    """``merges`` tokens to merge over ``depth`` blocks as a per-block ``r``: the same in every block,
    one more in the first ``merges mod depth`` (front-loaded). The FLOPs knob of every merging method."""
    base, extra = divmod(merges, depth)
    return [base + (1 if b < extra else 0) for b in range(depth)]
