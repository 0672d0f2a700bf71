"""Per-forward token state: the per-token fields that follow every merge and selection.

A :class:`TokenState` lives for one forward pass of one tower. It is created when the
tower's first block runs, so it is fresh for every forward however the tower is called
(``model(x)``, ``forward_features``, ``encode_image`` ...), and it stays readable after the
forward for monitoring and visualisation (:func:`vleff.backbones.last_token_state`).

Methods never edit per-token tensors one by one. A method *registers* a field (its value
``[B, N, ...]`` and its rule for combining tokens), and reducers call :meth:`TokenState.select`
(keep some tokens), :meth:`TokenState.merge` (apply a :class:`~vleff.kernels.tome.MergePlan`)
or :meth:`TokenState.fuse` (append one token made of a set of tokens): every registered field
follows, so a field added by a new method is handled by every reducer without editing it.

Rules (``reduce``) say what a token made of several tokens holds:

* ``"sum"``: sizes (input tokens a token stands for) and source maps add;
* ``"max"``: flags travel with their token (a merged token is protected/kept if any part was);
* ``"min"``: e.g. the first input position a token holds (text towers' causal order).

``size`` is built in: it is materialised (as ones) the first time tokens combine, so towers
where nothing merged never carry it and stay bit-exact with the library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from vleff.kernels.tome import MergePlan

Reduce = Literal["sum", "max", "min"]
REDUCE_RULES: tuple[str, ...] = ("sum", "max", "min")
SIZE = "size"


def _copy_containers(value: object) -> object:
    """``value`` with its dicts, lists and tuples copied (recursively); anything else shared."""
    if isinstance(value, dict):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_containers(v) for v in value)
    return value


def gather_tokens(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[b, idx[b]]`` for a ``[B, N, ...]`` tensor and ``[B, K]`` indices."""
    index = idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:])
    return t.gather(1, index)


def reduce_over(t: torch.Tensor, members: torch.Tensor, reduce: str) -> torch.Tensor:
    """One token ``[B, 1, ...]`` combining the tokens of ``t`` where ``members`` (``[B, N]`` bool) is set."""
    m = members.reshape(*members.shape, *([1] * (t.dim() - 2)))
    if reduce == "sum":
        return (t * m.to(t.dtype)).sum(dim=1, keepdim=True)
    if t.is_floating_point():
        fill = float("-inf") if reduce == "max" else float("inf")
    else:
        info = torch.iinfo(t.dtype)
        fill = info.min if reduce == "max" else info.max
    filled = t.masked_fill(~m, fill)
    out = filled.amax(dim=1, keepdim=True) if reduce == "max" else filled.amin(dim=1, keepdim=True)
    empty = ~members.any(dim=1)  # no member: a neutral value instead of +-inf
    if bool(empty.any()):
        out = out.masked_fill(empty.reshape(-1, *([1] * (t.dim() - 1))), 0)
    return out


@dataclass
class TokenField:
    """One registered per-token tensor ``[B, N, ...]`` and how tokens combine in it."""

    value: torch.Tensor
    reduce: Reduce


@dataclass
class TokenState:
    """What methods know about the current sequence of one tower forward.

    Attributes:
        num_prefix: leading tokens that reducers must keep in front (cls, distillation,
            registers, a cross token a hook appended).
        num_input_tokens: tokens entering the first block.
        fields: registered per-token fields by name (see the module docstring).
        token_counts: tokens entering each block, in order.
        aux_losses: auxiliary losses produced during this forward, by name.
        scratch: free space for hooks, by hook name (per-layer decisions etc.).
    """

    num_prefix: int
    num_input_tokens: int
    fields: dict[str, TokenField] = field(default_factory=dict)
    token_counts: list[int] = field(default_factory=list)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    scratch: dict[str, object] = field(default_factory=dict)
    num_tokens: int = 0
    batch_size: int = 0
    #: the :class:`~vleff.backbones.hooks.BlockInfo` of the block now running (its keys and
    #: attention rows follow reductions so that stacked hooks read valid values)
    block_info: object | None = None
    #: this state runs a replay: gradient checkpointing recomputing a block in backward. Hooks
    #: compute exactly what the forward computed (the same tensors, so that the recomputation
    #: saves what the forward saved) but leave nothing outside the state (no pairing, no
    #: holding a value for another tower)
    replaying: bool = False
    #: ``[b]`` indices in the whole batch of the samples this state's rows hold, in a view of part
    #: of the batch (:meth:`rows_view`: a block that only some samples run); ``None``: the whole batch
    rows: torch.Tensor | None = None
    _pending_fuse: object | None = None
    _view_origin: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- fields ----------------------------------------------------------------------------
    def register(self, name: str, value: torch.Tensor, reduce: Reduce) -> None:
        """Add a per-token field; ``value`` must be ``[B, N, ...]`` for the current sequence."""
        if reduce not in REDUCE_RULES:
            raise ValueError(f"reduce={reduce!r} is not a token-field rule; use one of {REDUCE_RULES}")
        if name in self.fields:
            raise ValueError(f"token field {name!r} is already registered (by another hook?)")
        if value.dim() < 2 or value.shape[:2] != (self.batch_size, self.num_tokens):
            raise ValueError(
                f"token field {name!r} has shape {tuple(value.shape)}; expected "
                f"[{self.batch_size}, {self.num_tokens}, ...] for the current sequence"
            )
        self.fields[name] = TokenField(value, reduce)

    def get(self, name: str) -> torch.Tensor | None:
        """The current value of field ``name`` (``None`` if no hook registered it)."""
        f = self.fields.get(name)
        return None if f is None else f.value

    def set(self, name: str, value: torch.Tensor) -> None:
        """Overwrite a registered field for the current sequence (same token count)."""
        if name not in self.fields:
            raise KeyError(f"token field {name!r} is not registered")
        if value.shape[:2] != (self.batch_size, self.num_tokens):
            raise ValueError(
                f"token field {name!r}: shape {tuple(value.shape)} does not match the "
                f"sequence [{self.batch_size}, {self.num_tokens}]"
            )
        self.fields[name].value = value

    @property
    def size(self) -> torch.Tensor | None:
        """``[B, N, 1]`` float32 input tokens each token stands for; ``None`` while each is one."""
        return self.get(SIZE)

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        """Token sizes, ones (float32) when no tokens have combined yet."""
        size = self.size
        if size is None:
            return torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
        return size

    def _materialise_size(self, like: torch.Tensor) -> None:
        if SIZE not in self.fields:
            ones = torch.ones(self.batch_size, self.num_tokens, 1, device=like.device, dtype=torch.float32)
            self.fields[SIZE] = TokenField(ones, "sum")

    # --- reductions ------------------------------------------------------------------------
    def select(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Keep tokens ``idx`` (``[B, K]``) of ``x`` and of every field; returns the new ``x``."""
        for f in self.fields.values():
            f.value = gather_tokens(f.value, idx)
        self.num_tokens = idx.shape[1]
        if self.block_info is not None:
            self.block_info._after_select(idx)
        return gather_tokens(x, idx)

    def merge(self, plan: MergePlan, merged_size: torch.Tensor | None = None) -> None:
        """Apply a merge plan to every field (``x`` itself is merged by the method, which knows
        its weights: ToMe's size-weighted mean, CrossGET's importance-weighted one).
        ``merged_size``: the new sizes when the method's merge already computed them."""
        from vleff.kernels.tome import merge_reduce

        if plan.r == 0:
            return
        self._materialise_size(plan.src_idx)
        size_before = self.fields[SIZE].value
        for name, f in self.fields.items():
            f.value = merged_size if name == SIZE and merged_size is not None else merge_reduce(f.value, plan, f.reduce)
        self.num_tokens = plan.num_out
        if self.block_info is not None:
            self.block_info._after_merge(plan, size_before)

    def fuse(self, members: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every field's value for one token made of the tokens where ``members`` (``[B, N]``
        bool) is set, as ``[B, 1, ...]`` tensors; pass them to :meth:`append` after selecting."""
        self._materialise_size(members)
        if self.block_info is not None:
            self._pending_fuse = self.block_info._fused(members, self.fields[SIZE].value)
        return {name: reduce_over(f.value, members, f.reduce) for name, f in self.fields.items()}

    def append(self, x: torch.Tensor, extra: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Append tokens ``extra`` (``[B, k, C]``) to ``x``, with a value for every field."""
        self._check_values("appending", values)
        for name, f in self.fields.items():
            f.value = torch.cat([f.value, values[name].to(f.value.dtype)], dim=1)
        self.num_tokens += extra.shape[1]
        if self.block_info is not None:
            pending, self._pending_fuse = self._pending_fuse, None
            k_extra, rows = pending if pending is not None else (None, {})
            self.block_info._after_append(k_extra, rows)
        return torch.cat([x, extra.to(x.dtype)], dim=1)

    def insert_prefix(self, x: torch.Tensor, extra: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Put tokens ``extra`` (``[B, k, C]``) right after the current prefix and make them part
        of it (a cross token that reducers must keep), with a value for every field."""
        self._check_values("inserting", values)
        p = self.num_prefix
        for name, f in self.fields.items():
            v = values[name].to(f.value.dtype)
            f.value = torch.cat([f.value[:, :p], v, f.value[:, p:]], dim=1)
        self.num_tokens += extra.shape[1]
        self.num_prefix += extra.shape[1]
        return torch.cat([x[:, :p], extra.to(x.dtype), x[:, p:]], dim=1)

    def _check_values(self, what: str, values: dict[str, torch.Tensor]) -> None:
        missing = set(self.fields) - set(values)
        if missing:
            raise ValueError(f"{what} tokens needs a value for every token field; missing {sorted(missing)}")

    # --- replay ----------------------------------------------------------------------------
    def snapshot(self) -> TokenState:
        """A copy to replay a block from (gradient checkpointing recomputes blocks in backward):
        every container copied, so a replay's merges, appends and scratch writes stay in the copy;
        tensors shared (they are never changed in place, only replaced)."""
        return TokenState(
            num_prefix=self.num_prefix,
            num_input_tokens=self.num_input_tokens,
            fields={name: TokenField(f.value, f.reduce) for name, f in self.fields.items()},
            token_counts=list(self.token_counts),
            aux_losses=dict(self.aux_losses),
            scratch={name: _copy_containers(v) for name, v in self.scratch.items()},
            num_tokens=self.num_tokens,
            batch_size=self.batch_size,
        )

    # --- part of the batch (a block that only some samples run) -----------------------------
    def rows_view(self, rows: torch.Tensor) -> TokenState:
        """The state of the samples ``rows`` (``[b]`` indices into the batch) for one block that
        only they run (:meth:`vleff.backbones.hooks.TowerHook.running_samples`): per-token fields
        hold those rows; token counts, aux losses and scratch are this state's own containers (a
        hook's writes there reach the whole forward). :meth:`absorb_rows` takes the fields back."""
        if self.rows is not None:
            raise RuntimeError("a view of part of the batch cannot be split again")
        view = TokenState(
            num_prefix=self.num_prefix,
            num_input_tokens=self.num_input_tokens,
            fields={name: TokenField(f.value[rows], f.reduce) for name, f in self.fields.items()},
            token_counts=self.token_counts,
            aux_losses=self.aux_losses,
            scratch=self.scratch,
            num_tokens=self.num_tokens,
            batch_size=int(rows.shape[0]),
            replaying=self.replaying,
            rows=rows,
        )
        view._view_origin = {name: f.value for name, f in view.fields.items()}
        return view

    def absorb_rows(self, view: TokenState) -> None:
        """Write the fields of ``view`` (from :meth:`rows_view`) back into their rows; refuse a view
        whose block changed the token count or the fields (the batch would no longer be one tensor)."""
        if (
            view.num_tokens != self.num_tokens
            or view.num_prefix != self.num_prefix
            or set(view.fields) != set(self.fields)
        ):
            raise RuntimeError(
                f"a block that only part of the batch ran changed its tokens ({self.num_tokens} -> {view.num_tokens} "
                "tokens, or the token fields): the samples that skipped it keep theirs, so the batch would no "
                "longer be one tensor. Token reduction cannot share a tower with a method that exits samples early"
            )
        assert view.rows is not None
        for name, f in self.fields.items():
            new = view.fields[name].value
            if new is not view._view_origin.get(name):
                f.value = f.value.index_copy(0, view.rows, new.to(f.value.dtype))

    # --- losses ----------------------------------------------------------------------------
    def add_aux_loss(self, name: str, value: torch.Tensor) -> None:
        """Accumulate an auxiliary loss under ``name`` (summed if added twice)."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value


#: the text layout's field marking each sample's protected token (its EOT, or BLIP's first token)
PROTECTED = "protected"


def eot_rows(state: TokenState) -> torch.Tensor:
    """``[B]`` current index of each sample's EOT token."""
    protected = state.get(PROTECTED)
    if protected is None:
        raise RuntimeError("this tower tracks no EOT token (not a text tower)")
    return protected.argmax(dim=1)
