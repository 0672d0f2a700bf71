"""Complete-graph soft matching and importance-weighted ("ensemble") merging (CrossGET).

ToMe (:mod:`vleff.kernels.tome`) splits the tokens into two alternating sets and merges
across them. CrossGET matches on the *complete* graph: any token may merge into any other,
guided by an importance score (from the cross token's or the EOT's query). As the official
code (``sdc17/CrossGET``, ``CLIP/clip/reducer.py``, ``TokenReduction.match``) does it:

* similarity ``S = k̂ k̂ᵀ`` of the normalised keys, with the diagonal, every edge touching a
  protected token (cls, the cross token, a text tower's SOT/EOT) and every edge between
  different groups (a text tower's padding and real tokens; vleff only) at ``-inf``;
* the tokens are **ranked** by their best similarity ``max_j S_ij``, highest first (ties: the
  lower index first; ``S`` is made exactly symmetric, so the two tokens of a mutual best pair
  tie and this rule, not the matmul's rounding, decides which may pair with the other); a token may only pair with
  tokens ranked *after* it (the reference's
  rank mask). Its score is ``importance − max_{j ranked after i} S_ij``; the ``r`` tokens with
  the lowest score become **sources** (unimportant, and redundant with a later token). A token
  with no later partner scores ``+inf`` and is never a source: so in every group the
  last-ranked token stays, and every source has a finite-similarity destination in its group;
* each source merges into its most similar **non-source** token (any rank), so no token is
  both a source and a destination (no chains);
* tokens of groups other than 0 (padding) become sources only after every possible source of
  group 0, as in ToMe's text path: padding never takes a merge away from real tokens, so a
  caption's embedding does not depend on how far it is padded (vleff only: the reference
  pads every caption to 77 tokens and merges padding like any token).

:class:`GraphMergePlan` applies the result to any per-token tensor. It implements the plan
protocol of :mod:`vleff.kernels.tome` (``r``, ``num_out``, ``num_tokens``, ``src_idx`` and
``merge_sum`` / ``merge_reduce`` / ``merge_weighted``), so :class:`~vleff.backbones.TokenState`
fields and the block's cached keys follow a CrossGET merge exactly as they follow a ToMe one.
:meth:`GraphMergePlan.merge_ensemble` is the reference's ensemble merge. Output order: the
kept tokens in their input order (protected leading tokens stay first); each destination holds
its sources. Scores and similarities are computed in float32, or in the input's dtype when
that is wider (float64 stays float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vleff.kernels.order import stable_argsort


@dataclass(frozen=True)
class GraphMergePlan:
    """Which tokens merge into which, for one layer of one batch (any token into any token).

    Attributes:
        src_idx: ``[B, r]`` input indices of the merged (source) tokens.
        dst_idx: ``[B, r]`` input indices of their destinations (never sources).
        keep_idx: ``[B, N - r]`` input indices of the tokens that stay, ascending.
        dst_pos: ``[B, r]`` output positions (into ``keep_idx``) of the destinations.
        num_protected: leading tokens never merged (kept first).
        num_tokens: tokens before merging.
    """

    src_idx: torch.Tensor
    dst_idx: torch.Tensor
    keep_idx: torch.Tensor
    dst_pos: torch.Tensor
    num_protected: int
    num_tokens: int

    @property
    def r(self) -> int:
        return self.src_idx.shape[1]

    @property
    def num_out(self) -> int:
        return self.num_tokens - self.r

    # --- the plan protocol of vleff.kernels.tome -----------------------------------------------
    def _flat(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        return t.reshape(t.shape[0], t.shape[1], -1), t.shape

    def merge_reduce(self, t: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Each output token combines its group of ``t`` (``[B, N, ...]``) with ``reduce``."""
        if reduce not in ("sum", "max", "min"):
            raise ValueError(f"reduce={reduce!r} must be 'sum', 'max' or 'min'")
        if self.r == 0:
            return t
        flat, shape = self._flat(t)
        kept = _rows(flat, self.keep_idx)
        src = _rows(flat, self.src_idx)
        index = self.dst_pos[..., None].expand(-1, -1, flat.shape[-1])
        if reduce == "sum":
            out = kept.scatter_add(1, index, src)
        else:
            out = kept.scatter_reduce(1, index, src, reduce="amax" if reduce == "max" else "amin", include_self=True)
        return out.reshape(shape[0], out.shape[1], *shape[2:])

    def merge_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.merge_reduce(t, "sum")

    def merge_weighted(
        self, x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted mean over each group: ``x' = Σ w·s·x / Σ w·s``, ``s' = Σ s``.

        ``weight`` (``[B, N, 1]``, positive; ``None``: ones) is CrossGET's ``ensemble="mean"``
        weight ``exp(importance)``; with ``None`` this is ToMe's size-weighted mean. Tokens that
        take part in no merge are copied, not recomputed (bit-exact)."""
        if self.r == 0:
            return x, size
        w = _wide(size) if weight is None else _wide(size) * _wide(weight)
        num = self.merge_sum(_wide(x) * w)
        den = self.merge_sum(w)
        received = torch.zeros(x.shape[0], self.num_out, 1, dtype=torch.bool, device=x.device).scatter(
            1, self.dst_pos[..., None], True
        )
        merged = torch.where(received, (num / den).to(x.dtype), _rows(x, self.keep_idx))
        return merged, self.merge_sum(size)

    def merge_ensemble(
        self, x: torch.Tensor, size: torch.Tensor, importance: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ensemble merge (``TokenReduction.forward``'s ``merge``), ``s' = Σ s``.

        Each source ``k`` and its destination ``d`` get the pair's softmax of importances
        ``a_k = σ(imp_k − imp_d)`` and ``1 − a_k`` (temperature 1). The reference merges the
        size-scaled tokens ``s·x``, scales both weights by 2 and adds, per source,
        ``2·a_k·s_k·x_k + (1 − 2·a_k)·s_d·x_d`` to the destination's ``s_d·x_d``, then divides by
        the summed size. With one source of size 1 into a destination of size 1 that is the
        softmax-weighted mean ``a·x_k + (1 − a)·x_d``; with unequal sizes or several sources per
        destination the coefficients are the reference's (they need not sum to 1 and the
        destination's can be negative). ``importance``: ``[B, N]``. Tokens that take part in no
        merge are copied (bit-exact). ``x``: ``[B, N, C]``; ``size``: ``[B, N, 1]``."""
        if self.r == 0:
            return x, size
        imp = _wide(importance)
        a = torch.sigmoid(imp.gather(1, self.src_idx) - imp.gather(1, self.dst_idx))[..., None]  # [B, r, 1]
        xs, xd = _rows(_wide(x), self.src_idx), _rows(_wide(x), self.dst_idx)
        ss, sd = _rows(_wide(size), self.src_idx), _rows(_wide(size), self.dst_idx)
        contrib = 2 * a * ss * xs + (1 - 2 * a) * sd * xd
        kept = _rows(_wide(x) * _wide(size), self.keep_idx)
        num = kept.scatter_add(1, self.dst_pos[..., None].expand(-1, -1, kept.shape[-1]), contrib)
        new_size = self.merge_sum(size)
        received = torch.zeros(x.shape[0], self.num_out, 1, dtype=torch.bool, device=x.device).scatter(
            1, self.dst_pos[..., None], True
        )
        merged = torch.where(received, (num / _wide(new_size)).to(x.dtype), _rows(x, self.keep_idx))
        return merged, new_size


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or in its own dtype when that is wider (float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))


#: added to the source score of tokens outside group 0 (padding); finite scores lie in [-2, 2]
GROUP_PENALTY = 8.0


def max_graph_merge(num_tokens: int, num_protected: int) -> int:
    """The reference's cap on one step: ``(N − protected) // 2``."""
    return max(0, (num_tokens - num_protected) // 2)


def similarity_graph(metric: torch.Tensor, protected: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N, N]`` cosine similarities, ``-inf`` on the diagonal, on edges touching a protected
    token (``protected``: ``[B, N]`` bool) and between different ``groups`` (``[B, N]`` ints)."""
    m = F.normalize(_wide(metric), dim=-1)
    s = m @ m.transpose(-1, -2)
    s = (s + s.transpose(-1, -2)) / 2  # exactly symmetric: a mutual best pair ties, the tie rule decides
    n = s.shape[-1]
    forbid = torch.eye(n, dtype=torch.bool, device=s.device)[None] | protected[:, :, None] | protected[:, None, :]
    if groups is not None:
        forbid = forbid | (groups[:, :, None] != groups[:, None, :])
    return s.masked_fill(forbid, float("-inf"))


#: merge groups a text tower uses: 0 = real tokens, 1 = padding. The group loops run over this
#: static range (not ``groups.unique()``), so they trace into one graph under ``torch.compile``;
#: a group no token belongs to changes nothing.
NUM_GROUPS = 2


def _check_groups(groups: torch.Tensor, num_groups: int) -> None:
    """Refuse group ids outside ``range(num_groups)`` (:func:`feasible_sources` would not count their tokens). An
    asynchronous device assert: no host sync per block, and it traces under ``torch.compile``."""
    torch._assert_async(
        ((groups >= 0) & (groups < num_groups)).all(),
        f"groups must take values in range({num_groups}) (0 = real tokens, 1 = padding)",
    )


def feasible_sources(
    protected: torch.Tensor, groups: torch.Tensor | None = None, num_groups: int = NUM_GROUPS
) -> torch.Tensor:
    """``[B]`` most sources each sample can give with every source keeping a destination in its
    group: ``Σ_groups max(free − 1, 0)`` (the last-ranked token of each group stays)."""
    free = ~protected
    if groups is None:
        return (free.sum(dim=1) - 1).clamp_min(0)
    _check_groups(groups, num_groups)
    total = torch.zeros(protected.shape[0], dtype=torch.long, device=protected.device)
    for g in range(num_groups):
        total = total + ((free & (groups == g)).sum(dim=1) - 1).clamp_min(0)
    return total


def complete_graph_matching(
    metric: torch.Tensor,
    importance: torch.Tensor,
    r: int,
    num_protected: int,
    protected: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
    num_groups: int = NUM_GROUPS,
) -> GraphMergePlan:
    """Plan the merge of ``r`` tokens by complete-graph soft matching (see the module docstring).

    Args:
        metric: ``[B, N, C]`` features to compare (CrossGET: the keys of all heads, concatenated).
        importance: ``[B, N]`` importance of each token (cosine with the guiding query).
        r: tokens to remove; the caller caps it (:func:`max_graph_merge`, :func:`feasible_sources`).
        num_protected: leading tokens never merged.
        protected: ``[B, N]`` further protected tokens anywhere (a text tower's EOT), or ``None``.
        groups: ``[B, N]`` merge groups (padding apart from real tokens), or ``None``.
        num_groups: ``groups`` take values in ``range(num_groups)`` (default: real, padding).
    """
    b, n = importance.shape
    if r < 0:
        raise ValueError(f"r={r} must be >= 0")
    with torch.no_grad():
        prot = torch.zeros(b, n, dtype=torch.bool, device=metric.device)
        prot[:, :num_protected] = True
        if protected is not None:
            prot = prot | protected.bool()
        if groups is not None:
            _check_groups(groups, num_groups)
        sim = similarity_graph(metric, prot, groups)
        # the reference's rank mask: i may pair with j only if j ranks after i by best similarity
        ranked = stable_argsort(sim.amax(dim=-1), descending=True)
        rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(n, device=ranked.device).expand(b, n))
        later = rank[:, None, :] > rank[:, :, None]
        best_later = sim.masked_fill(~later, float("-inf")).amax(dim=-1)
        score = _wide(importance) - best_later  # no later partner (the last of a group, protected): +inf
        score = score.masked_fill(prot, float("inf"))
        if groups is not None:  # finite scores lie in [-2, 2]: every real token ranks first
            score = torch.where(groups != 0, score + GROUP_PENALTY, score)
        order = stable_argsort(score)
        src = order[:, :r]
        is_src = torch.zeros(b, n, dtype=torch.bool, device=metric.device).scatter(1, src, True)
        to_dst = sim.masked_fill(is_src[:, None, :], float("-inf"))
        dst = to_dst.gather(1, src[..., None].expand(-1, -1, n)).argmax(dim=-1)
        keep = stable_argsort(is_src.to(torch.int8))[:, : n - r]  # non-sources, ascending
        out_pos = (~is_src).long().cumsum(dim=1) - 1
        dst_pos = out_pos.gather(1, dst)
    return GraphMergePlan(src, dst, keep, dst_pos, num_protected, n)


def ensemble_weights(importance: torch.Tensor) -> torch.Tensor:
    """``[B, N, 1]`` weights of CrossGET's ``ensemble="mean"`` before the per-group
    normalisation: ``exp(importance)``, so a group's weights are the softmax of its
    importances at the reference's temperature 1 (times sizes, in :meth:`GraphMergePlan.merge_weighted`)."""
    return _wide(importance).exp()[..., None]


__all__ = [
    "GraphMergePlan",
    "complete_graph_matching",
    "ensemble_weights",
    "feasible_sources",
    "max_graph_merge",
    "similarity_graph",
]
