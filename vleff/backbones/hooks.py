"""The hook protocol every method implements, and what a hook sees of a block.

A tower patched by :func:`vleff.backbones.patch_tower` runs the generic block forward
(:mod:`vleff.backbones.block`) and calls the installed hooks, in installation order, at five
entry points. Every entry point has the same shape, ``(x, ..., state) -> x``::

    x = hook.start(x, state)              # once per tower forward, before block 0 (append a cross token)
    for each block i:
        x = hook.before(x, info, state)   # block input (DynamicViT decides here, CrossGET re-injects)
        x = x + F(x)                      # attention branch; info gains q, k, v, attention
        x = hook.between(x, info, state)  # ToMe merges, EViT prunes
        x = x + G(x)                      # MLP branch
        x = hook.after(x, info, state)    # block output (side networks, distillation)
    x = hook.finish(x, state)             # after the last block, before the tower pools

A hook may also say which samples run a block (:meth:`TowerHook.running_samples`: early exit);
the block then runs on those samples' rows only, and the others pass it unchanged.

Hooks also contribute to every block's attention: :meth:`TowerHook.attention_bias` (additive,
e.g. proportional attention's ``+log size``) and :meth:`TowerHook.attention_keep` (a soft keep
mask over keys, DynamicViT's training masks). The block itself knows no method's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vleff.backbones.state import TokenState, eot_rows, gather_tokens

if TYPE_CHECKING:
    from vleff.backbones.base import AttentionConfig

KEEP_MASK_EPS = 1e-6


class StaleBlockInfo(RuntimeError):
    """A hook read a per-token tensor of the block after an earlier hook changed the tokens."""


@dataclass
class BlockInfo:
    """What hooks see of one block.

    In ``before`` only ``index``, ``depth`` and ``block`` are set. From ``between`` on:

    Attributes:
        h: ``[B, N, C]`` the normed block input the attention read.
        q, k, v: ``[B, H, N, Dh]`` queries, keys (after q/k norm) and values.
        head_outputs: ``[B, H, N, Dh]`` per-head attention outputs (before the out projection).
        probs: ``[B, H, N, N]`` attention probabilities; only for blocks where a hook's
            :meth:`TowerHook.needs_attention_probs` is true (that block then takes the explicit path).
        bias: the additive attention bias the block used (library mask, causal mask, hooks' biases).

    When a hook in ``between`` changes the tokens (through the state's ``select``/``merge``/``fuse``),
    ``k`` and the cached attention rows follow (keys gathered or size-weighted merged, attention
    mass gathered or summed), so a later hook in the same block still reads valid keys and
    scores; ``h``, ``q``, ``v``, ``head_outputs`` and ``probs`` no longer describe the sequence
    and raise :class:`StaleBlockInfo` when read.
    """

    index: int
    depth: int
    block: torch.nn.Module | None = None
    #: the tower's adapter (a hook that runs the block's own projections on its own inputs)
    adapter: Any = None
    cfg: AttentionConfig | None = None
    bias: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    want_probs: bool = False
    state: TokenState | None = None
    #: post-norm towers run by the library with a key/value cache (generation): that cache (from
    #: ``before`` on; the block updates it in its self-attention), else ``None``
    cache: Any = None
    _h: torch.Tensor | None = None
    _q: torch.Tensor | None = None
    _k: torch.Tensor | None = None
    _v: torch.Tensor | None = None
    _head_outputs: torch.Tensor | None = None
    _probs: torch.Tensor | None = None
    _rows: dict[int | str, torch.Tensor] = field(default_factory=dict)
    _pending_keys: list = field(default_factory=list)
    stale: bool = False

    def _fresh(self, name: str, value: torch.Tensor | None) -> torch.Tensor:
        if self.stale:
            raise StaleBlockInfo(
                f"block {self.index}: BlockInfo.{name} describes the tokens before an earlier hook "
                "changed them; read it before the change (install this hook first) or use keys"
            )
        if value is None:
            raise AttributeError(f"block {self.index}: BlockInfo.{name} is not available at this entry point")
        return value

    @property
    def h(self) -> torch.Tensor:
        return self._fresh("h", self._h)

    @property
    def q(self) -> torch.Tensor:
        return self._fresh("q", self._q)

    @property
    def v(self) -> torch.Tensor:
        return self._fresh("v", self._v)

    @property
    def head_outputs(self) -> torch.Tensor:
        return self._fresh("head_outputs", self._head_outputs)

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None and not self.stale:
            raise AttributeError(
                f"block {self.index}: attention probabilities were not computed; a hook must "
                "return True from needs_attention_probs(index) for this block"
            )
        return self._fresh("probs", self._probs)

    @property
    def keys(self) -> torch.Tensor:
        """``[B, H, N, Dh]`` keys of the current tokens (kept valid across reductions; remapped
        lazily, so a reduction costs nothing when no later hook reads the keys)."""
        if self._k is None:
            raise AttributeError(f"block {self.index}: keys are not available at this entry point")
        for op in self._pending_keys:
            self._k = op(self._k)
        self._pending_keys.clear()
        return self._k

    def row_attention(self, row: int | str = 0) -> torch.Tensor:
        """``[B, N]`` attention from token ``row`` of the block input to every token, averaged over
        heads (EViT's cls attention for ``row=0``). Computed from q and k (O(N) work) with the
        bias the block used, so fused attention stays fused; cached and kept valid across reductions."""
        if row in self._rows:
            return self._rows[row]
        if self.stale:
            raise StaleBlockInfo(
                f"block {self.index}: attention row {row} was not computed before an earlier hook "
                "changed the tokens; return it from the hook's attention_rows(index)"
            )
        q, k = self.q, self.keys
        cfg = self.cfg
        assert cfg is not None
        if row == "eot":  # per sample: the text tower's EOT token
            assert self.state is not None
            rows = eot_rows(self.state)
        elif isinstance(row, int):
            rows = torch.full((q.shape[0],), row, dtype=torch.long, device=q.device)
        else:
            raise ValueError(f"row={row!r} must be a token index or 'eot'")
        index = rows[:, None, None, None].expand(-1, q.shape[1], 1, q.shape[-1])
        logits = (q.gather(2, index).float() * cfg.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
        if self.bias is not None:
            b = self.bias.float()
            if b.shape[-2] > 1:
                b = b.expand(q.shape[0], *b.shape[1:]) if b.dim() == 4 else b.expand(q.shape[0], 1, *b.shape[-2:])
                b = b.gather(2, rows[:, None, None, None].expand(-1, b.shape[1], 1, b.shape[-1]))
            logits = logits + b
        probs = logits.softmax(dim=-1)
        if self.keep is not None:  # the block's keep-masked softmax gives dropped keys no weight
            probs = _keep_row(logits, self.keep, rows)
        out = probs.mean(dim=1)[:, 0]
        self._rows[row] = out
        return out

    # --- following a reduction (called by the state) ----------------------------------------
    def _after_select(self, idx: torch.Tensor) -> None:
        if self._k is not None:
            self._pending_keys.append(_KeySelect(idx))
        self._rows = {r: gather_tokens(a, idx) for r, a in self._rows.items()}
        self.stale = True

    def _after_merge(self, plan, size: torch.Tensor) -> None:
        from vleff.kernels.tome import merge_sum

        if self._k is not None:
            self._pending_keys.append(_KeyMerge(plan, size))
        self._rows = {r: merge_sum(a[..., None], plan)[..., 0] for r, a in self._rows.items()}
        self.stale = True

    def _fused(self, members: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Key (size-weighted mean) and attention mass (sum) of one token made of ``members``."""
        k_extra = None
        if self._k is not None:
            keys = self.keys
            w = size[..., 0] * members.to(size.dtype)
            w = (w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)).to(keys.dtype)
            k_extra = (keys * w[:, None, :, None]).sum(dim=2, keepdim=True)
        rows = {r: (a * members.to(a.dtype)).sum(dim=1, keepdim=True) for r, a in self._rows.items()}
        return k_extra, rows

    def _after_append(self, k_extra: torch.Tensor | None, rows_extra: dict[int, torch.Tensor]) -> None:
        if self._k is not None and k_extra is not None:
            keys = self.keys
            self._k = torch.cat([keys, k_extra.to(keys.dtype)], dim=2)
        self._rows = {r: torch.cat([a, rows_extra[r]], dim=1) for r, a in self._rows.items() if r in rows_extra}
        self.stale = True


class _KeySelect:
    def __init__(self, idx: torch.Tensor) -> None:
        self.idx = idx

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        return gather_tokens(k.transpose(1, 2), self.idx).transpose(1, 2)


class _KeyMerge:
    """Keys of merged tokens: the size-weighted mean of their parts' keys."""

    def __init__(self, plan, size: torch.Tensor) -> None:
        self.plan, self.size = plan, size

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        from vleff.kernels.tome import merge_weighted

        b, h, n, d = k.shape
        merged, _ = merge_weighted(k.transpose(1, 2).reshape(b, n, h * d), self.size, self.plan)
        return merged.reshape(b, -1, h, d).transpose(1, 2)


def _keep_row(logits: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` (``[B]``) of the block's keep-masked softmax
    (:func:`vleff.backbones.block.keep_masked_softmax`), for the logits of those rows ``[B, H, 1, N]``:
    dropped keys get no weight except from themselves; shifted by the maximum over allowed keys."""
    n = logits.shape[-1]
    k = keep.to(logits.dtype)[:, None, None, :]
    own = torch.zeros_like(k).scatter(-1, rows[:, None, None, None], 1.0)
    weight = k + (1.0 - k) * own
    allowed = weight > 0
    row_max = logits.masked_fill(~allowed, float("-inf")).amax(dim=-1, keepdim=True)
    shifted = torch.where(allowed, logits - row_max, (logits - row_max).clamp(max=0.0))
    e = shifted.exp() * weight
    return (e + KEEP_MASK_EPS / n) / (e.sum(dim=-1, keepdim=True) + KEEP_MASK_EPS)


class TowerHook:
    """Base class of every method's hook: no-op entry points, one signature shape.

    Subclasses set ``name`` (unique per tower) and override what they need. Hooks must be
    plain picklable objects (no closures): models are deep-copied and saved whole.
    """

    name: ClassVar[str] = ""
    #: the hook is a pure function of a block's input and the token state the block started from
    #: (it writes only to that state, never to itself or the model), so gradient checkpointing can
    #: recompute a block in backward from a copy of that state (:meth:`TowerPatch.run`); towers
    #: with a hook that is not are refused checkpointing, at apply and at the forward
    replayable: ClassVar[bool] = False
    #: the hook hands tensors that need gradients to code outside the blocks (collected in the
    #: token state's scratch and read after the forward). Re-entrant checkpointing runs the forward
    #: without gradients and would cut them, so only non-re-entrant checkpointing is allowed
    side_outputs: ClassVar[bool] = False

    def conflict_with(self, other: TowerHook) -> str | None:
        """Why this hook cannot share a tower with ``other``, or ``None``. Asked both ways when
        either is attached (:func:`vleff.backbones.patch.check_attachable`), so a pair that cannot
        run together is refused at apply time, never at the first forward."""
        return None

    def forward_inputs(self) -> Any:
        """What :meth:`start` reads besides its arguments, captured earlier in the same forward
        (a text tower's token ids). Recorded with the first block's entry, so that a replay of the
        first block, which runs ``start`` again, starts from the same. Default: nothing."""
        return None

    def restore_forward_inputs(self, inputs: Any) -> None:
        """Put back what :meth:`forward_inputs` returned, before a replayed ``start``."""

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        return x

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        return x

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        return x

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        return x

    def running_samples(self, index: int, state: TokenState) -> torch.Tensor | None:
        """``[B]`` bool: which samples of the batch run block ``index``, or ``None`` (all of them).

        Samples left out skip the block: their tokens pass it unchanged (early exit, MuE). The
        patched forward (:meth:`vleff.backbones.patch.TowerPatch.run`) ANDs every hook's answer and
        runs the block on the running samples' rows only (no compute for the others, in eager mode);
        every hook then sees, in ``before``/``between``/``after``, only those rows, with a token state
        whose per-token fields hold them and whose ``rows`` gives their indices in the whole batch
        (:meth:`TokenState.rows_view`; a hook keeping per-sample tensors in the scratch indexes them
        by ``rows``). A block run on part of the batch must keep its token count
        (methods that reduce tokens cannot share a tower with one that answers here; the registry's
        rules refuse them). ``finish`` always sees the whole batch. Default: ``None``."""
        return None

    def skipped_cache(
        self, index: int, adapter: Any, cache: Any, rows: torch.Tensor, count: int, state: TokenState
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Under the library's key/value cache (generation), what block ``index``'s self-attention
        cache holds at the ``count`` new positions for the samples ``rows`` that skip it (this hook
        left them out in :meth:`running_samples`): ``(keys, values)``, ``[len(rows), H, count, Dh]``
        (MuE: the previous block's entries, so the exit layer's). ``None``: not this hook's samples
        (default); a block run on part of the batch under a cache needs an answer."""
        return None

    def attention_rows(self, index: int) -> tuple[int, ...]:
        """Query rows whose head-averaged attention block ``index`` computes up front
        (:meth:`BlockInfo.row_attention`), so they stay valid after an earlier hook's reduction."""
        return ()

    def needs_attention_probs(self, index: int) -> bool:
        """Whether block ``index`` must materialise the full attention probabilities."""
        return False

    def library_mask(
        self, mask: torch.Tensor | None, is_causal: bool, state: TokenState
    ) -> tuple[torch.Tensor | None, bool]:
        """The library's attention mask and causal flag for this block, possibly replaced (a text
        tower's layout hook rebuilds the causal mask once the sequence has changed)."""
        return mask, is_causal

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive attention bias (``[B, 1, 1, N]`` over keys, or ``[B, 1, N, N]``), or ``None``."""
        return None

    def attention_keep(self, state: TokenState) -> torch.Tensor | None:
        """Soft keep weights ``[B, N]`` over keys: a key with keep 0 gets no attention except
        from itself (differentiable in the weights), or ``None``."""
        return None

    def attention_prefix(
        self, info: BlockInfo, state: TokenState, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Extra keys and values ``[B or 1, H, P, Dh]`` placed in front of block ``info.index``'s
        self-attention keys and values, or ``None``.

        Every query attends to them (the causal mask, padding and keep masks cover the tokens
        only); they are not tokens: nothing else reads them, no output row comes from them, and
        ``info``'s keys and probabilities leave them out. ``h`` is the normed input the attention
        reads (a hook that makes its keys from learned tokens runs them through the same
        projections: ``info.adapter.qkv(info.block, ...)``). Prefix-tuning, VPT-deep and attention
        prompts are this seam."""
        return None

    def branch(self, name: str, x: torch.Tensor, out: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        """Sublayer ``name``'s output ``out``, rewritten (default: unchanged).

        ``name`` is ``"attention"`` (after the output projection) or ``"mlp"`` (the MLP's output; a
        post-norm block's FFN after its dropout); ``out`` comes before the layer scale, drop path
        and residual add of the block, ``x`` is the residual stream the sublayer read (before its
        norm). Serial adapters return ``out + adapter(out)``, parallel ones ``out + s·adapter(x)``."""
        return out
