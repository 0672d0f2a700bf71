"""MADTP (Cao et al., CVPR 2024): alignment-guided dynamic token pruning on both towers of an
image-text model (open_clip ``CLIP``, Hugging Face ``CLIPModel``, Hugging Face BLIP).

* **Alignment codebook**: one learnable ``randn(num_codes, code_dim)`` shared by both towers
  (``vleff_madtp.codebook`` on the model). Before every block each tower scores its content
  tokens A against it, ``T = proj_l(A) · codebookᵀ`` (``[B, N, codes]``); ``proj_l`` is a
  per-block ``Linear(width → code_dim)`` when the towers' widths differ (CLIP), the identity
  when they are equal (BLIP). In training the layer's *alignment feature* is the
  softmax-over-tokens weighting ``softmax(T/√D)ᵀ · proj_l(A)`` (``[B, codes, D]``), summed over
  layers; the loss ``align_weight · mean(1 − cos(f_image, f_text))`` over the codebook rows
  pulls the towers' summaries together (recorded as the aux loss ``madtp/align``).
* **Pruning** between the attention residual and the MLP (BLIP text: after self-attention,
  before cross-attention), over the candidate tokens (not cls/prefix, not the text's EOT or
  pooled token, not padding). Importance ``S`` = mean of three scores, each normalised over the
  candidates (divided by their sum, as the reference): attention received (max over heads,
  summed over the queries), codebook score (max over codes of the raw dot products;
  ``code_norm="shift"`` subtracts the minimum first), and the pooling token's attention
  weighted per head by the norm of that head's output. Threshold per sample
  ``min_c Σ_j softmax_j(T_jc / τ) · S_j``; a sample keeps the candidates above it, the others
  are **fused** into one token weighted by ``S``. As in the reference CLIP code, a block leaves a
  sample alone when at most ``min_keep`` (default 1, the reference's ``max_keep``) candidates
  clear the threshold -- one dominating token is no reason to drop all the others -- or when it
  would fuse a single token (that saves nothing); ``min_keep=0`` is the reference BLIP code's
  rule (a block prunes to one token when only one clears the threshold). Text padding
  is never a candidate; the first pruning block drops it (beyond the batch's longest text),
  which changes no real token's output (padding is masked) and is most of a short caption's
  cost in a 77-token context (the reference keeps it as candidates).
* **τ** is not learned: :func:`calibrate_madtp` searches it so the *measured* FLOPs
  (:mod:`vleff.flops`) of the model hit ``baseline × (1 − flops_reduction)``;
  :class:`vleff.callbacks.MADTP` does that before training and after every epoch. τ lives in
  the model's ``state_dict`` (``vleff_madtp._extra_state``), so checkpoints restore it.

**Ragged keep counts** (``ragged``): samples of one batch keep different numbers of tokens.

* ``"mask"`` (default, better than the reference): every sample keeps exactly its own tokens;
  the batch's rectangle is filled with *filler* slots (text padding first, then the sample's
  best fused-away tokens) that no token attends to (an additive bias; a filler field follows
  every later reduction) and that later blocks never keep or fuse. A sample's output does not
  depend on the rest of its batch (tested): retrieval embeddings cached one batch at a time
  stay the same whatever they were batched with. The rectangle (the compute) is what the
  neediest sample needs (a sample that fuses nothing while others do puts its last kept token
  in the fused token's slot), so a block never puts out more tokens than it got.
* ``"max"`` (the reference): every sample keeps the batch-maximum count of its best tokens,
  so a sample's pruning depends on its batch.

Text towers keep causal order and find their EOT after pruning through the framework's text
layout (:mod:`vleff.backbones.text`), which the reference CLIP code does not (it pools at the
original EOT index with a fixed mask). A causal *encoder* pooled at its EOT (CLIP) is pruned;
a causal *decoder* (BLIP captioning's ``text_decoder``, a prediction at every position; the
reference prunes BLIP's retrieval and NLVR2 encoders only) is refused -- at apply time unless
``towers="image"``, and when a tower runs as one: the threshold and the fused token mix the whole
sequence, so outputs at earlier positions would depend on later tokens. With
``towers="image"`` the decoder only supplies its alignment feature (a loss, not an output).

>>> vleff.apply_madtp(model, flops_reduction=0.5)
>>> vleff.calibrate_madtp(model, batches)          # τ for 0.5x the measured FLOPs
>>> loss = task_loss + vleff.vleff_aux_loss(model) # training: the alignment loss
>>> vleff.remove_madtp(model)
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerHook
from vleff.backbones.pairs import (
    ModelPair,
    Pairing,
    caption_mask,
    find_pair,
    image_text_parts,
    pair_context,
    pair_or_hold,
    pairs_in,
)
from vleff.backbones.patch import check_attachable
from vleff.backbones.state import gather_tokens
from vleff.backbones.text import (
    PAD,
    PROTECTED,
    eot_rows,
    refuse_causal_decoder,
    refuse_causal_decoder_towers,
)
from vleff.checks import check_choice, check_int, check_number, check_towers
from vleff.kernels.order import stable_argsort
from vleff.registry import MethodConfig
from vleff.tokens.common import (
    attach_hooks,
    hook_settings,
    hooks_named,
    remove_hooks,
    tower_modalities,
)

HOOK_NAME = "madtp"
MODULE_NAME = "vleff_madtp"
FILLER = "madtp_filler"
ALIGN_LOSS = "madtp/align"
TOWERS = ("image", "text")
RAGGED = ("mask", "max")
CODE_NORMS = ("sum", "shift")
#: the reference's guard in every normalisation (``x / (x.sum() + 1e-8)``)
EPS = 1e-8


def check_flops_reduction(value: Any) -> float:
    """MADTP's FLOPs target, in (0, 1): the one rule, asked by :class:`MADTPConfig`, the
    controller and :func:`calibrate_madtp`."""
    return check_number("flops_reduction", value, low=0, high=1, low_open=True, high_open=True, owner="MADTP")


@dataclass
class MADTPConfig(MethodConfig):
    """MADTP's settings.

    Attributes:
        flops_reduction: the FLOPs target of the controller, in (0, 1): the calibrated model
            costs ``baseline × (1 − flops_reduction)`` (:func:`calibrate_madtp`).
        tau: the temperature until the controller sets it (> 0; higher prunes more).
        num_codes: rows of the alignment codebook (paper: 100).
        code_dim: codebook width (``None``: the wider tower's width).
        align_weight: weight of the cosine alignment loss (paper: 0.1).
        locations: blocks that prune (``None``: every block, as the reference; ``()``: none,
            only the alignment features are computed).
        min_keep: a block prunes a sample (``ragged="max"``: the batch) only if more than
            ``min_keep`` candidates clear its threshold, else it keeps them all there (the
            reference CLIP code's ``max_keep``, 1; ``0`` is the reference BLIP code's rule).
        ragged: ``"mask"`` (per-sample exact, batch-independent) or ``"max"`` (the reference's
            batch maximum); see the module docstring.
        code_norm: how the codebook score (max over codes of the raw dot products) is
            normalised over the candidates: ``"sum"`` (the reference: divided by its sum) or
            ``"shift"`` (vleff's earlier choice: minus its minimum, then divided by the sum, which
            guards against a sum near zero; measured in ``docs/fidelity.md``).
        towers: which towers prune: ``"all"``, ``"image"`` or ``"text"`` (the alignment
            features always come from both).
    """

    method = "madtp"
    flops_reduction: float = 0.5
    tau: float = 1.0
    num_codes: int = 100
    code_dim: int | None = None
    align_weight: float = 0.1
    locations: Sequence[int] | None = None
    min_keep: int = 1
    ragged: str = "mask"
    towers: str = "all"
    code_norm: str = "sum"

    def __post_init__(self) -> None:
        self.flops_reduction = check_flops_reduction(self.flops_reduction)
        self.tau = check_number("tau", self.tau, low=0, low_open=True, owner="MADTP")
        self.num_codes = check_int("num_codes", self.num_codes, low=1)
        if self.code_dim is not None:
            self.code_dim = check_int("code_dim", self.code_dim, low=1)
        self.align_weight = check_number("align_weight", self.align_weight, low=0, owner="MADTP")
        if self.locations is not None:
            self.locations = _check_locations(self.locations)
        self.min_keep = check_int("min_keep", self.min_keep, low=0)
        check_choice("ragged", self.ragged, RAGGED)
        check_choice("code_norm", self.code_norm, CODE_NORMS)
        check_towers(self.towers, TOWERS)


def _check_locations(locations: object, depth: int | None = None, tower: str = "") -> tuple[int, ...]:
    if isinstance(locations, (str, bytes)) or not isinstance(locations, Sequence):
        raise ValueError(f"locations={locations!r} is not allowed; give a sequence of block indices or None")
    locs = list(locations)
    for loc in locs:
        if not isinstance(loc, numbers.Integral) or isinstance(loc, bool) or loc < 0:
            raise ValueError(f"locations={locations!r}: {loc!r} is not a block index (an integer >= 0)")
        if depth is not None and loc >= depth:
            raise ValueError(
                f"locations={locations!r}: {loc} is not a block of the {tower} tower (it has {depth} blocks)"
            )
    if any(b <= a for a, b in zip(locs, locs[1:])):
        raise ValueError(f"locations={locations!r} must be strictly increasing")
    return tuple(int(loc) for loc in locs)


# --------------------------------------------------------------------------------------------
class MADTPModule(nn.Module):
    """The learnable parts (codebook, per-block projections) and the temperature τ.

    τ is a Python float saved through ``get_extra_state`` (so dtype casts of the model never
    round it and every checkpoint carries it). ``enabled=False`` turns both towers' hooks into
    pass-throughs (the controller measures the baseline that way)."""

    def __init__(
        self, num_codes: int, code_dim: int, widths: dict[str, int], depths: dict[str, int], tau: float
    ) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))
        project = len(set(widths.values())) > 1 or any(w != code_dim for w in widths.values())
        self.proj = nn.ModuleDict(
            {
                m: nn.ModuleList(
                    [nn.Linear(widths[m], code_dim) if project else nn.Identity() for _ in range(depths[m])]
                )
                for m in widths
            }
        )
        self.tau = float(tau)
        #: the first block that prunes (the controller's second knob, see :func:`calibrate_madtp`)
        self.start = 0
        #: τ was chosen: by :func:`calibrate_madtp`, a checkpoint, or ``update_madtp(tau=...)``
        #: (``False`` while τ is the starting value; the callback then calibrates before an evaluation)
        self.calibrated = False
        self.enabled = True
        self.__dict__["_pending"] = {}

    def get_extra_state(self) -> dict[str, float]:
        return {"tau": self.tau, "start": self.start, "calibrated": self.calibrated}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.tau = float(state["tau"])
        self.start = int(state.get("start", 0))
        # a checkpoint from before the flag holds the τ it trained with: keep it as chosen
        self.calibrated = bool(state.get("calibrated", True))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pending"] = {}  # alignment features of an unfinished step hold autograd graphs
        return state

    @property
    def pending(self) -> dict[str, Any]:
        """Alignment features waiting for the other tower (outside a :class:`PairContext`), as
        :class:`vleff.backbones.pairs.Held` entries that expire with their step."""
        return self.__dict__.setdefault("_pending", {})


def alignment_loss(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``mean(1 − cos)`` over the codebook rows of two ``[B, codes, D]`` alignment features
    (``torch.nn.CosineEmbeddingLoss`` with target 1)."""
    return (1.0 - F.cosine_similarity(image.float(), text.float(), dim=-1)).mean()


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores are computed in float32 at least (half-precision sums over tokens round badly)
    and in float64 for a float64 model (so a reference comparison is exact to float noise)."""
    return torch.promote_types(t.dtype, torch.float32)


def _normalise(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``score / (Σ score + EPS)`` over the tokens in ``mask`` (0 elsewhere), the reference's
    normalisation of every score and of the fusion weights (a sum of 0, no token, gives 0)."""
    s = score * mask
    return s / (s.sum(dim=1, keepdim=True) + EPS)


class MADTPHook(TowerHook):
    """MADTP on one tower: alignment features before each block, pruning between attention and MLP."""

    name = HOOK_NAME
    #: replays from its state (scores, masks and the alignment feature are made in the block from
    #: its input; the alignment loss pairs in the last block with the partner the forward recorded)
    replayable = True
    #: the alignment feature is built inside the blocks and read by the loss outside them
    side_outputs = True

    def __init__(
        self,
        module: MADTPModule,
        modality: str,
        root: nn.Module,
        locations: tuple[int, ...],
        prune: bool,
        config: MADTPConfig,
    ) -> None:
        self.module = module
        self.modality = modality
        self.root = root
        self.locations = locations if prune else ()
        self.config = config

    # --- helpers ----------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.module.enabled

    def _prunes(self, index: int) -> bool:
        return self.module.enabled and index in self.locations and index >= self.module.start

    def _training(self) -> bool:
        return self.module.training and torch.is_grad_enabled()

    def _content(self, state: TokenState) -> torch.Tensor:
        """``[B, N]`` tokens that are words/patches of the sample: not prefix, not padding, not filler."""
        b, n = state.batch_size, state.num_tokens
        dev = self.module.codebook.device
        mask = torch.ones(b, n, dtype=torch.bool, device=dev)
        mask[:, : state.num_prefix] = False
        for name in (PAD, FILLER):
            v = state.get(name)
            if v is not None:
                mask = mask & ~v.bool()
        return mask

    # --- entry points ----------------------------------------------------------------------------
    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        if torch.compiler.is_exporting() and self._prunes_anywhere():
            raise RuntimeError(
                f"torch.export cannot take MADTP on the {self.modality} tower: it keeps a data-dependent number of "
                "tokens (those whose codebook score clears τ, per sample), and an exported graph needs token counts "
                "fixed at export time. Export with MADTP removed (vleff.remove_madtp) or its towers= leaving this "
                "tower out; torch.compile (not fullgraph) does run it"
            )
        state.scratch[HOOK_NAME] = {"feature": None, "pairing": Pairing()}  # pairing: shared by replay copies
        return x

    def _prunes_anywhere(self) -> bool:
        return any(self._prunes(i) for i in self.locations)

    def needs_attention_probs(self, index: int) -> bool:
        return self._prunes(index)

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        """Score the block input against the codebook (the tokens do not change until ``between``,
        which uses the scores; the padding of a BLIP text is only known from block 0's library
        mask, read after this entry point, so the content mask is applied in ``between``)."""
        if not self._active() or (not self._prunes(info.index) and not self._training()):
            return x
        a = self.module.proj[self.modality][info.index](x)  # [B, N, D]
        state.scratch[HOOK_NAME]["codes"] = (a, a @ self.module.codebook.to(a.dtype).t())  # [B, N, C]
        return x

    def between(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        scratch = state.scratch.get(HOOK_NAME, {})
        codes = scratch.pop("codes", None)
        if codes is None:
            return x
        a, t = codes
        if self._training():
            content = self._content(state).to(x.device)
            logits = (t.float() / math.sqrt(a.shape[-1])).masked_fill(~content[..., None], float("-inf"))
            w = logits.softmax(dim=1).nan_to_num(0.0)  # a sample without content tokens contributes 0
            feature = w.transpose(1, 2).to(a.dtype) @ a  # [B, C, D]
            scratch["feature"] = feature if scratch["feature"] is None else scratch["feature"] + feature
        if not self._prunes(info.index):
            return x
        return self._prune(x, info, state, t.to(_score_dtype(t)))

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        scratch = state.scratch.get(HOOK_NAME, {})
        feature = scratch.get("feature")
        if feature is None or not self._training():
            return x
        ctx = pair_context(state)
        store = ctx.data.setdefault(HOOK_NAME, {}) if ctx is not None else self.module.pending
        # the other tower has not run in this step (or ran on other samples): hold, wait for it
        other = pair_or_hold(
            state,
            store,
            scratch["pairing"],
            self.modality,
            feature,
            x,
            self.module.codebook,
            compatible=lambda other: other.shape == feature.shape,
        )
        if other is not None:
            image, text = (feature, other) if self.modality == "image" else (other, feature)
            state.add_aux_loss(ALIGN_LOSS, alignment_loss(image, text) * self.config.align_weight)
        return x

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        filler = state.get(FILLER)
        if filler is None:
            return None
        low = torch.finfo(dtype).min / 2  # finite: a row whose every key is a filler stays finite
        return (filler.to(dtype) * low)[:, None, None, :]

    # --- pruning ----------------------------------------------------------------------------
    def importance(
        self, info: BlockInfo, state: TokenState, t: torch.Tensor, cand: torch.Tensor, live: torch.Tensor
    ) -> torch.Tensor:
        """``[B, N]`` importance ``S`` of the candidates (0 elsewhere)."""
        probs = info.probs.to(t.dtype)  # [B, H, N, N]
        queries = live.clone()
        queries[:, : state.num_prefix] = False
        received = (probs.amax(dim=1) * queries[:, :, None]).sum(dim=1)  # [B, N] over keys
        s_attn = _normalise(received, cand)
        code = t.amax(dim=-1)  # raw dot products: the reference divides them by their sum as they are
        if self.config.code_norm == "shift":  # vleff's earlier choice, kept as an option
            low = code.masked_fill(~cand, float("inf")).amin(dim=1, keepdim=True)
            code = (code - low).clamp_min(0)
        s_code = _normalise(code.masked_fill(~cand, 0), cand)
        rows = self._pool_rows(state, probs)
        index = rows[:, None, None, None].expand(-1, probs.shape[1], 1, probs.shape[-1])
        pooled = probs.gather(2, index)[:, :, 0]  # [B, H, N]
        heads = info.head_outputs.to(t.dtype).norm(dim=-1)  # [B, H, N]
        heads = heads / (heads.sum(dim=1, keepdim=True) + EPS)
        s_cls = (pooled * heads).sum(dim=1) * cand
        return (s_attn + s_code + s_cls) / 3.0

    def _pool_rows(self, state: TokenState, probs: torch.Tensor) -> torch.Tensor:
        if state.get(PROTECTED) is not None:
            return eot_rows(state)  # the text's pooled token (CLIP: EOT; BLIP: token 0)
        return torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)

    @torch.compiler.disable(recursive=True)  # data-dependent keep counts: run eagerly under torch.compile
    def _prune(self, x: torch.Tensor, info: BlockInfo, state: TokenState, t: torch.Tensor) -> torch.Tensor:
        refuse_causal_decoder(state, "MADTP")
        b, n = x.shape[:2]
        dev = x.device
        live = self._content(state).to(dev)  # not prefix / padding / filler
        protected = state.get(PROTECTED)
        cand = live & ~protected.bool() if protected is not None else live
        live = live.clone()
        live[:, : state.num_prefix] = True  # prefix tokens are live queries and always kept
        score = self.importance(info, state, t, cand, live)
        # per-sample threshold: min over codes of the code-weighted mean importance
        w = (t / self.module.tau).masked_fill(~cand[..., None], float("-inf")).softmax(dim=1).nan_to_num(0.0)
        threshold = (w * score[..., None]).sum(dim=1).amin(dim=1)  # [B]
        n_cand = cand.sum(dim=1)
        k = ((score > threshold[:, None]) & cand).sum(dim=1)
        # the reference leaves a block alone where at most ``max_keep`` (CLIP images: 1, here
        # ``min_keep``) candidates clear the threshold, or where at most one would be fused
        # (fusing a single token saves nothing)
        if self.config.ragged == "max":  # the reference: the batch maximum
            k_max = int(k.max())
            k = torch.minimum(torch.full_like(k, k_max), n_cand)
            if k_max <= self.config.min_keep or int((n_cand - k).max()) <= 1:
                k = n_cand
        else:  # per sample
            k = torch.where((k <= self.config.min_keep) | (n_cand - k <= 1), n_cand, k)
        ranked = score.masked_fill(~cand, float("-inf"))
        order = stable_argsort(ranked, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n))
        keep = cand & (rank < k[:, None])
        fuses = (cand & ~keep).any(dim=1)  # [B] samples that fuse at this block
        carry = torch.zeros_like(keep)
        if bool(fuses.any()):
            # one slot is appended for the fused tokens; a sample that fuses nothing moves its last
            # kept candidate there (a token "fused" alone is that token, exactly), so the batch's
            # rectangle is what its neediest sample needs and never longer than the block's input
            carry = keep & (rank == (k - 1)[:, None]) & ~fuses[:, None]
        fixed = live & ~cand  # prefix, protected
        filler_old = state.get(FILLER)
        spare = ~live & ~cand  # padding and earlier fillers: free filler slots
        if filler_old is not None:
            spare = spare | filler_old.bool()
        slots = (fixed | keep) & ~carry
        # slot order: kept tokens, then spare slots, then the best fused-away candidates (the
        # carried token last: it is never needed as a filler)
        fallback = torch.where(carry, 0.0, 1.0 - (rank.to(score.dtype) + 1) / (n + 1))
        key = torch.where(slots, 3.0, torch.where(spare, 2.0, fallback))
        total = int(slots.sum(dim=1).max())
        idx = key.topk(total, dim=1).indices.sort(dim=1).values
        chosen = torch.zeros_like(cand).scatter(1, idx, True)
        keep = cand & chosen if self.config.ragged == "max" else keep & ~carry  # "max": filler slots are kept
        members = cand & ~keep  # what the appended token holds: the dropped candidates, or the carried one
        if not bool(members.any()):  # nothing to fuse: only padding beyond the longest text goes
            return x if total == n else state.select(x, idx)
        weight = torch.where(fuses[:, None], _normalise(score, members), members.to(score.dtype))
        fused = (weight.to(x.dtype)[..., None] * x).sum(dim=1, keepdim=True)
        new_filler = None
        if self.config.ragged == "mask":
            if filler_old is None:
                state.register(FILLER, torch.zeros(b, n, dtype=torch.long, device=dev), "max")
                filler_old = state.get(FILLER)
            new_filler = (filler_old.bool() | (chosen & cand & ~keep)).long()
        values = state.fuse(members)
        x = state.select(x, idx)
        if new_filler is not None:
            state.set(FILLER, gather_tokens(new_filler, idx))
            values[FILLER] = (~members.any(dim=1, keepdim=True)).long()  # nothing fused: the slot is filler
        return state.append(x, fused, values)


# --------------------------------------------------------------------------------------------
def _find_pair_in(model: nn.Module) -> ModelPair:
    """The image-text pair ``model`` is or holds (its one pair submodule); a model with one
    tower, or none, gets ``TypeError`` saying MADTP needs both."""
    try:
        return find_pair(model)
    except TypeError as first:
        outer = pairs_in(model)  # the model is no pair: its outermost pair submodules
        if len(outer) == 1:
            return outer[0][1]
        if len(outer) > 1:
            raise ValueError(
                f"{type(model).__name__} holds {len(outer)} image-text models "
                f"({', '.join(n for n, _ in outer)}); apply MADTP to one of them"
            ) from None
        raise TypeError(
            f"MADTP does not support {type(model).__name__}: it needs both towers (image and text) of "
            f"one image-text model, because each tower's pruning is guided by a codebook aligned "
            f"across the two ({first})"
        ) from None


def _pair_and_module(model: nn.Module) -> tuple[ModelPair, MADTPModule]:
    pair = _find_pair_in(model)
    module = getattr(pair.model, MODULE_NAME, None)
    if not isinstance(module, MADTPModule):
        raise ValueError(f"MADTP is not applied to this {type(model).__name__}; call apply_madtp first")
    return pair, module


def apply_madtp(model: nn.Module, config: MADTPConfig | None = None, **settings: Any) -> nn.Module:
    """MADTP on both towers of an image-text ``model`` (in place).

    Args:
        model: an open_clip ``CLIP``, a Hugging Face ``CLIPModel`` or BLIP model, or a module
            holding exactly one of them (a LightningModule).
        config: a :class:`MADTPConfig`; ``settings`` (``flops_reduction=0.5`` ...) build or update it.

    Raises:
        TypeError: ``model`` has one tower or none (MADTP needs both).
        ValueError: a bad setting, another token method on a tower MADTP prunes, or ``towers``
            naming a text tower the model runs as a causal decoder (BLIP captioning: use
            ``towers="image"``).

    Returns:
        ``model``. Applying twice replaces the earlier codebook. τ starts at ``tau``; call
        :func:`calibrate_madtp` (or train with :class:`vleff.callbacks.MADTP`) to hit the FLOPs target.
    """
    cfg = MADTPConfig.build(config, **settings)
    pair = _find_pair_in(model)
    towers = {"image": pair.image_tower, "text": pair.text_tower}
    prune = tower_modalities(cfg.towers)
    locs = {
        m: (
            tuple(range(len(t.blocks())))
            if cfg.locations is None
            else _check_locations(cfg.locations, len(t.blocks()), m)
        )
        for m, t in towers.items()
    }
    if "text" in prune:
        refuse_causal_decoder_towers(
            pair.model,
            [pair.text_tower],
            "MADTP",
            f"towers={cfg.towers!r}",
            "Use towers='image' (the decoder then only supplies its alignment feature)",
        )
    widths = {m: t.embed_dim for m, t in towers.items()}
    depths = {m: len(t.blocks()) for m, t in towers.items()}
    code_dim = cfg.code_dim or max(widths.values())
    param = next(pair.model.parameters())
    module = MADTPModule(cfg.num_codes, code_dim, widths, depths, cfg.tau).to(device=param.device, dtype=param.dtype)
    module.train(pair.model.training)
    hooks = [MADTPHook(module, m, t.root, locs[m], m in prune, cfg) for m, t in towers.items()]
    for tower, hook in zip(towers.values(), hooks):  # every conflict refused before the model changes
        check_attachable(tower, hook)
    if hooks_named(pair.model, HOOK_NAME):
        remove_madtp(pair.model)
    setattr(pair.model, MODULE_NAME, module)
    attach_hooks(list(towers.values()), hooks)
    return model


def remove_madtp(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_madtp`: hooks and codebook removed, the towers run their own forward."""
    try:
        pair = _find_pair_in(model)
    except TypeError:
        pair = None
    root = pair.model if pair is not None else model
    if remove_hooks(root, HOOK_NAME) == 0:
        raise ValueError(f"MADTP is not applied to this {type(model).__name__}; nothing to remove")
    if MODULE_NAME in root._modules:
        delattr(root, MODULE_NAME)
    return model


def madtp_applied(model: nn.Module) -> bool:
    try:
        pair = _find_pair_in(model)
    except (TypeError, ValueError):
        return False
    return bool(hooks_named(pair.model, HOOK_NAME))


def madtp_tau(model: nn.Module) -> float:
    """The current temperature of an applied MADTP."""
    return _pair_and_module(model)[1].tau


def update_madtp(model: nn.Module, **changes: Any) -> None:
    """Change ``tau``, ``flops_reduction``, ``align_weight``, ``min_keep``, ``ragged`` or ``code_norm`` of an
    applied MADTP.

    τ lives in one place, the model's MADTP module (:func:`madtp_tau` reads it): the config's
    ``tau`` is the starting value :func:`apply_madtp` used, so a new ``tau`` is validated by the
    config's rule and set on the module only."""
    pair, module = _pair_and_module(model)
    hooks = hooks_named(pair.model, HOOK_NAME)
    old = hooks[0].config
    tau = old.replace(tau=changes.pop("tau")).tau if "tau" in changes else None
    new = old.replace(**changes)
    for key in ("num_codes", "code_dim", "locations", "towers"):
        if getattr(new, key) != getattr(old, key):
            raise ValueError(
                f"{key} cannot change on an applied MADTP ({getattr(old, key)!r} -> "
                f"{getattr(new, key)!r}); apply it again"
            )
    for hook in hooks:
        hook.config = new
    if tau is not None:
        module.tau = tau
        module.calibrated = True  # a τ the user (or a restored controller) chose


# --- the FLOPs controller -------------------------------------------------------------------------
Batch = Any


def batch_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(images, token ids, attention mask or None)`` from a batch: a tuple/list
    ``(images, ids[, mask])`` or a dict with ``images``/``pixel_values``, ``tokens``/``input_ids``
    and optionally ``attention_mask``."""
    parts = image_text_parts(batch)
    if parts is None:
        raise TypeError(
            f"a MADTP calibration batch must be (images, token_ids[, attention_mask]) or a dict with "
            f"'images'/'pixel_values' and 'tokens'/'input_ids'; got {type(batch).__name__}"
        )
    images, ids, mask = parts
    return images, ids, mask


def pair_forward(pair: ModelPair, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """One image-text forward whose FLOPs the controller counts: CLIP encodes both towers;
    BLIP runs the vision tower and the text encoder cross-attending to its output (the
    image-text matching path, where MADTP prunes the text before cross-attention)."""
    images, ids, mask = batch_inputs(batch)
    param = next(pair.model.parameters())
    images = images.to(device=param.device, dtype=param.dtype if images.is_floating_point() else None)
    ids = ids.to(param.device)
    mask = mask.to(param.device) if mask is not None else None
    return pair.matching_forward(images, ids, mask)  # BLIP's matching path lives in its pair adapter


def image_forward(pair: ModelPair, batch: Batch) -> torch.Tensor:
    """The image tower alone (``forward=`` of :func:`calibrate_madtp` for an image-tower FLOPs target)."""
    images = batch_inputs(batch)[0]
    param = next(pair.model.parameters())
    return pair.encode_image(images.to(device=param.device, dtype=param.dtype))


def text_forward(pair: ModelPair, batch: Batch) -> torch.Tensor:
    """The text tower alone, without cross-attention (a text-tower FLOPs target)."""
    _, ids, mask = batch_inputs(batch)
    param = next(pair.model.parameters())
    return pair.encode_text(ids.to(param.device), mask.to(param.device) if mask is not None else None)


def calibrate_madtp_for_bench(model: nn.Module, inputs: torch.Tensor, tower: str) -> MADTPCalibration:
    """τ for the applied ``flops_reduction`` of one tower's FLOPs on ``inputs`` as one batch
    (images for ``tower="image"``, zero-padded caption ids for ``"text"``): what ``vleff-bench``
    measures, the batch's cost at its largest keep count."""
    if tower == "image":  # the ids are not read by image_forward
        batch = (inputs, torch.zeros(inputs.shape[0], 1, dtype=torch.long, device=inputs.device))
    elif tower == "text":  # nor the images by text_forward
        batch = (torch.empty(0), inputs, caption_mask(inputs))
    else:
        raise ValueError(f"tower={tower!r} is not allowed; use 'image' or 'text'")
    return calibrate_madtp(model, [batch], forward=FORWARDS[tower])


#: what the controller counts, by name (``measure=`` of the callback, mixin and controller)
FORWARDS: dict[str, Callable[[ModelPair, Batch], Any]] = {
    "pair": pair_forward,
    "image": image_forward,
    "text": text_forward,
}


def measure_flops(
    model: nn.Module, batches: Sequence[Batch], forward: Callable[[ModelPair, Batch], Any] | None = None
) -> int:
    """FLOPs (:func:`vleff.flops.count_flops`) of ``forward(pair, batch)`` summed over ``batches``,
    in eval mode without gradients (the model's mode is restored)."""
    from vleff.flops import count_flops

    pair = _find_pair_in(model)
    fwd = forward or pair_forward
    was = pair.model.training
    pair.model.eval()
    try:
        return int(sum(count_flops(lambda b=b: fwd(pair, b)) for b in batches))
    finally:
        pair.model.train(was)


@dataclass
class MADTPCalibration:
    """What :func:`calibrate_madtp` found.

    Attributes:
        tau: the temperature set on the model.
        flops: measured FLOPs at ``tau`` (summed over the calibration batches).
        baseline: measured FLOPs of the model without MADTP (same batches).
        target: ``baseline × (1 − flops_reduction)``.
        evaluations: every ``(tau, flops, start)`` tried, in order.
        start: the first pruning block set on the model.
    """

    tau: float
    flops: int
    baseline: int
    target: float
    flops_reduction: float
    evaluations: list[tuple[float, int, int]] = field(default_factory=list)
    start: int = 0

    @property
    def ratio(self) -> float:
        """Measured FLOPs over the baseline."""
        return self.flops / self.baseline

    @property
    def error(self) -> float:
        """Relative distance to the target, ``|flops − target| / target``."""
        return abs(self.flops - self.target) / self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "flops": self.flops,
            "baseline": self.baseline,
            "target": self.target,
            "flops_reduction": self.flops_reduction,
            "evaluations": [list(e) for e in self.evaluations],
            "start": self.start,
        }


TAU_RANGE = (1e-4, 1e6)


def single_samples(batches: Iterable[Batch], samples: int) -> list[tuple[torch.Tensor, ...]]:
    """The first ``samples`` samples of ``batches``, each as a batch of one."""
    out: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        images, ids, mask = batch_inputs(batch)
        for i in range(images.shape[0]):
            if len(out) == samples:
                return out
            out.append((images[i : i + 1], ids[i : i + 1]) + ((mask[i : i + 1],) if mask is not None else ()))
    return out


def calibrate_madtp(
    model: nn.Module,
    batches: Iterable[Batch],
    flops_reduction: float | None = None,
    *,
    forward: Callable[[ModelPair, Batch], Any] | None = None,
    tau0: float | None = None,
    rtol: float = 0.005,
    max_evals: int = 40,
    baseline: int | None = None,
    samples: int | None = None,
) -> MADTPCalibration:
    """Set MADTP's τ so the measured FLOPs of ``model`` on ``batches`` hit ``baseline × (1 − flops_reduction)``.

    The FLOPs are counted (:mod:`vleff.flops`, eval mode, no grad) on the calibration batches
    for MADTP off (the baseline) and for each τ tried. FLOPs fall as τ grows (a flatter
    softmax moves each sample's threshold towards its mean importance), but only in steps and
    not strictly monotonically (pruning more at one block changes the next block's scores).
    So the search brackets the target from ``tau0`` (the current τ) by factors of 4 in log
    space, bisects the bracket geometrically (two thirds of ``max_evals`` at most), then, if the
    bisection ended on a step larger than ``rtol``, scans τ log-spaced within ±30 % of the
    crossing (the FLOPs scatter there, see the code) and keeps the τ whose FLOPs were closest to
    the target. It stops once within ``rtol`` of the target.

    A second knob covers targets τ alone cannot reach: the lowest τ still prunes some tokens at
    every block (each sample keeps the tokens above its threshold, and the threshold is at
    least the lowest importance among the codes' favourite tokens), so a small
    ``flops_reduction`` can lie above the lowest-τ FLOPs. Then the first pruning block
    (``start``, 0 = every block, as the reference) moves later one block at a time and τ is
    searched again there; the per-epoch adjustment moves it back when the highest τ prunes too
    little. ``start`` is saved with τ in the model's state.

    Args:
        batches: a few batches (see :func:`batch_inputs`); their sample count sets the
            batch-maximum cost, so calibrate with the batch size you run.
        flops_reduction: in (0, 1); default: the applied config's.
        forward: ``forward(pair, batch)`` to count instead of :func:`pair_forward`.
        baseline: known baseline FLOPs for these batches (skips measuring it).
        samples: count the first ``samples`` samples one at a time (batch 1) instead of the
            batches as given. A batch costs its maximum keep count (the rectangle), which for
            large batches stays near the full length whatever τ is; per-sample FLOPs are what
            each sample's own pruning costs (batch-1 serving, or a variable-length kernel).

    Warns:
        RuntimeWarning: the target is out of reach within τ in ``TAU_RANGE`` (the closest τ is set).
    """
    pair, module = _pair_and_module(model)
    hooks = hooks_named(pair.model, HOOK_NAME)
    p = hooks[0].config.flops_reduction if flops_reduction is None else check_flops_reduction(flops_reduction)
    rtol = check_number("rtol", rtol, low=0, low_open=True)
    max_evals = check_int("max_evals", max_evals, low=2)
    batches = list(batches)
    if samples is not None:
        batches = single_samples(batches, check_int("samples", samples, low=1))
    if not batches:
        raise ValueError("batches is empty; give at least one calibration batch")
    if baseline is None:
        module.enabled = False
        try:
            baseline = measure_flops(pair.model, batches, forward)
        finally:
            module.enabled = True
    target = baseline * (1.0 - p)
    evals: list[tuple[float, int, int]] = []  # (tau, flops, start)
    lo_bound, hi_bound = TAU_RANGE
    last_start = max((max(h.locations) for h in hooks if h.locations), default=0)

    def close() -> bool:
        return min(abs(v - target) for _, v, _ in evals) <= rtol * target

    def flops_at(tau: float) -> int:
        module.tau = tau
        value = measure_flops(pair.model, batches, forward)
        evals.append((tau, value, module.start))
        return value

    def search(tau: float, budget: int) -> str:
        """τ search at the current start block; ``"low"``/``"high"``: even the lowest/highest τ
        gives FLOPs below/above the target."""
        stop = len(evals) + budget
        tau = min(max(tau, lo_bound), hi_bound)
        f = flops_at(tau)
        lo = hi = tau  # invariant once bracketed: flops(lo) > target >= flops(hi)
        if f > target:  # prune more: raise τ
            while f > target and hi < hi_bound and len(evals) < stop:
                lo, hi = hi, min(hi * 4.0, hi_bound)
                f = flops_at(hi)
            if f > target and hi >= hi_bound:
                return "high"
        else:
            while f <= target and lo > lo_bound and len(evals) < stop:
                hi, lo = lo, max(lo / 4.0, lo_bound)
                f = flops_at(lo)
            if f <= target and lo <= lo_bound and not close():
                return "low"
        bisect_stop = len(evals) + max(2, (2 * (stop - len(evals))) // 3)
        while lo < hi and len(evals) < bisect_stop and not close() and hi / lo > 1.02:
            mid = math.sqrt(lo * hi)
            if flops_at(mid) > target:
                lo = mid
            else:
                hi = mid
        if lo < hi and not close():
            # the count is a step function, and a token kept or dropped at one block reshuffles
            # the next blocks' scores: near the crossing the FLOPs scatter around the trend, so a
            # local log-spaced scan finds a τ closer than the single step bisection ended on
            centre, left = math.sqrt(lo * hi), stop - len(evals)
            for i in range(left):
                if close():
                    break
                step = (i // 2 + 1) * 0.3 / max(1, left // 2)
                flops_at(centre * math.exp(step if i % 2 == 0 else -step))
        return "ok"

    # τ first; if even the lowest τ prunes too much (or the highest too little), move the first
    # pruning block later (earlier) and search τ again there
    first = float(tau0 if tau0 is not None else module.tau)
    outcome = search(first, max_evals)
    tried = {module.start}
    while outcome in ("low", "high") and len(evals) < max_evals:
        step = 1 if outcome == "low" else -1
        if not 0 <= module.start + step <= last_start or module.start + step in tried:
            break
        module.start += step
        tried.add(module.start)
        # one count at the τ bound that failed tells whether this start can reach the target at
        # all; without it each start walked τ to the bound again (~7 counts), and a text tower,
        # whose every pruning block drops the padding, ran out of budget blocks before the start
        # that reaches a small reduction
        bound = lo_bound if outcome == "low" else hi_bound
        f = flops_at(bound)
        if (f <= target if outcome == "low" else f > target) and not close():
            continue
        outcome = search(first, max(4, (max_evals - len(evals)) // 2))
    best_tau, best, best_start = min(evals, key=lambda e: (abs(e[1] - target), e[2], e[0]))
    module.tau, module.start = best_tau, best_start
    module.calibrated = True
    for hook in hooks:
        hook.config = hook.config.replace(flops_reduction=p)  # τ's one owner is the module
    result = MADTPCalibration(best_tau, best, baseline, target, p, evals, best_start)
    if result.error > max(rtol, 0.03):
        warnings.warn(
            f"MADTP could not reach flops_reduction={p}: the closest τ={best_tau:.4g} (first pruning "
            f"block {best_start}) gives "
            f"{best / baseline:.3f}x the baseline FLOPs (target {1 - p:.3f}x); "
            f"{searched_range(evals, max_evals)}",
            RuntimeWarning,
            stacklevel=2,
        )
    return result


def fit_flops(
    model: nn.Module, batches: list[Batch], flops: float, forward: Callable[[nn.Module, Batch], Any], max_evals: int
) -> dict:
    """MADTP's FLOPs knob for :func:`vleff.fit_budget`: its controller searches τ (and the first
    pruning block) for ``flops_reduction = 1 − flops``, counting ``forward(model, batch)``."""
    reduction = 1.0 - flops if flops < 1 else 1e-6  # the controller's range is open at 0
    result = calibrate_madtp(
        model, batches, reduction, forward=lambda pair, batch: forward(model, batch), max_evals=max_evals
    )
    return {"tau": result.tau, "flops_reduction": result.flops_reduction}


def budget_snapshot(model: nn.Module) -> Callable[[], None]:
    """What :func:`fit_flops` changes, kept (``Budget.snapshot``): the MADTP module's state (τ, the
    first pruning block, whether τ was chosen) and each hook's config (its ``flops_reduction``);
    the returned function puts them back."""
    pair, module = _pair_and_module(model)
    state = module.get_extra_state()
    configs = [(hook, hook.config) for hook in hooks_named(pair.model, HOOK_NAME)]

    def restore() -> None:
        module.set_extra_state(state)
        for hook, config in configs:
            hook.config = config

    return restore


def searched_range(evals: list[tuple[float, int, int]], max_evals: int) -> str:
    """What a calibration actually tried, for its out-of-budget warning: the τ range and first
    pruning blocks of the counted forwards (not the bounds it may search: with a small
    ``max_evals`` it stops well inside them, and naming the bounds overstated the search)."""
    taus = [e[0] for e in evals]
    starts = sorted({e[2] for e in evals})
    return (
        f"{len(evals)} counted forwards (max_evals={max_evals}) tried τ in [{min(taus):.4g}, {max(taus):.4g}] "
        f"with first pruning block(s) {starts}; raise max_evals to search further"
    )


def madtp_settings(model: nn.Module) -> dict[str, Any]:
    """MADTP's settings as applied to ``model``: its hooks' config, with τ from its one owner, the
    model's MADTP module (the config keeps the starting value)."""
    out = hook_settings(model, HOOK_NAME)
    if out:
        out["tau"] = madtp_tau(model)
    return out
