"""Transkimmer (Guan et al., ACL 2022): learned layer-wise token skimming, on image and text towers.

A small *skim predictor* sits in front of chosen blocks (default: every block, as the paper),
``LayerNorm(d) → Linear(d, d) → LayerNorm(d) → GELU → Linear(d, 2)``, reading each block's input
tokens except the protected ones (image towers: the prefix, i.e. cls, distillation token, registers;
text towers: the pooled token, CLIP's EOT or BLIP's first token). Output channel 1 is
"keep", channel 0 "skip". The last Linear starts "unbalanced": weight ``N(0, 0.02)``, bias
``[skip, keep] ~ (N(−b, 0.02), N(+b, 0.02))`` with ``b = init_bias`` (paper: 5), so a new
predictor skims almost nothing (P(skip) ≈ 4.5·10⁻⁵ per token and block for ``b = 5``).

* **Training** (predictors in train mode): a straight-through hard Gumbel-softmax sample
  (temperature ``tau``) gives the keep mask ``m_l``; prefix tokens are forced to 1 and
  ``m_l ← m_l · m_{l−1}`` (a skimmed token never comes back). The mask is the token field
  ``"transkimmer_keep"``, which the generic block's keep-masked softmax applies to every later
  block's attention: kept tokens give skimmed keys no weight. This is *DynamicViT's* masking
  (renormalised over the kept keys), not the reference's (which multiplies the probabilities by
  ``m`` after the softmax without renormalising): renormalised masking makes the training
  forward of the kept tokens equal the real drop done at inference. Skimmed tokens keep their
  state: after the block, ``x ← x_in·(1 − m) + x·m``, so each token's final state is its state
  at the last block that kept it ("forwarded to the output"; differentiable in ``m``).
* **Skim loss** (recorded as the aux loss ``"transkimmer/skim"``):
  ``skim_coefficient · (1/L) Σ_l mean_b(Σ_n m_l,n) / N`` over the ``L`` predictor blocks, ``N`` =
  all tokens of the tower input (prefix included, its mask is 1), as the reference.
* **Inference** (eval mode): deterministic decisions, keep iff ``logit_keep − logit_skip > 0``
  (the reference samples Gumbel noise in eval too; vleff does not). Each sample runs its own
  kept tokens: at each decision the sequence is packed per sample, its kept tokens first, and
  shrinks to the count of the sample that keeps the most. A sample that keeps fewer fills the
  rest with tokens it skims (fillers: masked by a ``−inf`` attention bias on those keys, each
  token still seeing itself, and carrying their forwarded state), so every sample computes exactly
  what it computes alone, and a batch costs its widest sample, not the union of what its samples
  keep (where the training's keep-masked softmax spreads an epsilon of 1e-6 over all keys, the
  inference mask is exact). At the end every token is put back at its input position with its
  forwarded state, so the tower's output has its input length.
  ``eval_mode="mask"`` keeps every token and masks (the test of drop against mask).
* **Text towers** (CLIP's causal text towers, BLIP's text encoder; causal decoders refused): the
  tower's layout hook rebuilds the causal / padding mask once tokens are removed and puts the
  tokens back at their input positions after the last block, where removed positions get zeros
  (the pooled token, never skimmed, is what the tower's embedding reads). Decisions are per
  token from its own state, so a sample's embedding does not depend on later positions (in
  training, up to the keep-masked softmax's epsilon of 1e-6 spread over all keys).

The predictors are an ``nn.Module`` registered on each tower root as ``vleff_transkimmer``
(trained by ``model.parameters()``, saved in ``state_dict``): to load such a checkpoint, call
:func:`apply_transkimmer` on the fresh model first.

>>> vleff.apply_transkimmer(model)             # training: loss = task + vleff_aux_loss(model)
>>> vleff.remove_transkimmer(model)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import BlockInfo, TokenState, TowerAdapter, TowerHook, find_towers
from vleff.backbones.state import PROTECTED
from vleff.backbones.text import refuse_causal_decoder_towers
from vleff.checks import check_choice, check_number, check_towers
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks, select_towers
from vleff.tokens.pruning import check_locations

HOOK_NAME = "transkimmer"
MODULE_NAME = "vleff_transkimmer"
KEEP = "transkimmer_keep"  # token field: the keep mask (float 0/1), prefix 1
POSITION = "transkimmer_position"  # token field (eval drop mode): each token's input position
KEEP_CHANNEL, SKIP_CHANNEL = 1, 0
TOWERS = ("image", "text")


@dataclass
class TranskimmerConfig(MethodConfig):
    """Transkimmer's settings.

    Attributes:
        skim_coefficient: λ of ``task + λ·skim`` (``scripts/run_glue.sh``: 0.5).
        init_bias: the unbalanced init ``b``: keep bias ``~N(+b, 0.02)``, skip bias ``~N(−b, 0.02)``
            (reference: 5). ``b <= 0`` starts by skimming (tests, ablations).
        tau: Gumbel-softmax temperature in training (reference: 1).
        locations: block indices (strictly increasing) with a predictor in front; ``None``: every block.
        eval_mode: ``"drop"`` (each sample runs only the tokens it keeps, packed per sample) or
            ``"mask"`` (kept in place and masked, the training computation made deterministic).
        keep_threshold: inference keeps a token iff its predictor's keep probability
            ``softmax(logits)[keep]`` is above this (strictly), i.e. ``logit_keep − logit_skip >
            log(t / (1 − t))``. The default 0.5 is the paper's argmax; it is the FLOPs knob of
            :func:`vleff.fit_budget` (higher: fewer tokens), usable after training since it moves
            no weight. ``0`` keeps every token, ``1`` skims every token the predictors may skim.
            Training (Gumbel sampling) does not read it.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "transkimmer"
    skim_coefficient: float = 0.5
    init_bias: float = 5.0
    tau: float = 1.0
    locations: Sequence[int] | None = None
    eval_mode: str = "drop"
    keep_threshold: float = 0.5
    towers: str = "image"

    def __post_init__(self) -> None:
        self.skim_coefficient = check_number("skim_coefficient", self.skim_coefficient, low=0, owner="Transkimmer")
        self.init_bias = check_number("init_bias", self.init_bias, owner="Transkimmer")
        self.tau = check_number("tau", self.tau, low=0, low_open=True, owner="Transkimmer")
        if self.locations is not None:
            self.locations = check_locations("locations", self.locations, 10_000)
        check_choice("eval_mode", self.eval_mode, ("drop", "mask"))
        self.keep_threshold = check_number("keep_threshold", self.keep_threshold, low=0, high=1, owner="Transkimmer")
        check_towers(self.towers, TOWERS)


class SkimPredictor(nn.Module):
    """``LayerNorm(d) → Linear(d, d) → LayerNorm(d) → GELU → Linear(d, 2)``: ``d² + 7d + 2`` parameters."""

    def __init__(self, dim: int, init_bias: float = 5.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, 2)
        )
        last = self.net[-1]
        with torch.no_grad():
            last.weight.normal_(0.0, 0.02)
            last.bias[KEEP_CHANNEL].normal_(init_bias, 0.02)
            last.bias[SKIP_CHANNEL].normal_(-init_bias, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M, d]`` tokens → ``[B, M, 2]`` logits (skip, keep)."""
        return self.net(x)


class TranskimmerPredictors(nn.Module):
    """The predictors of one tower, registered on its root as ``vleff_transkimmer``."""

    def __init__(self, dim: int, num: int, init_bias: float) -> None:
        super().__init__()
        self.predictors = nn.ModuleList(SkimPredictor(dim, init_bias) for _ in range(num))


class TranskimmerHook(TowerHook):
    """The Transkimmer hook of one tower.

    ``state.scratch["transkimmer"]`` holds, per forward: ``masks`` (``[B, N]`` keep masks over the
    tokens entering each predictor block, prefix 1; in drop mode over the tokens still in the
    sequence, in each sample's packed order), ``x_in`` (the input of the running block, while some
    sample carries a token it skims) and, in drop mode on image towers, ``out`` (``[B, N₀, C]``: the
    forwarded states).
    """

    name = HOOK_NAME
    #: decisions live in the token state (the Gumbel noise is restored by checkpointing's RNG
    #: state); the skim loss leaves the blocks through the state: non-re-entrant checkpointing only
    replayable = True
    side_outputs = True

    def __init__(
        self,
        predictors: TranskimmerPredictors,
        locations: list[int],
        config: TranskimmerConfig,
        forward_skimmed: bool = True,
    ) -> None:
        self.predictors = predictors
        self.locations = locations
        self.config = config
        #: image towers: removed tokens are put back at their input positions after the last block;
        #: text towers leave that to the tower's layout hook (removed positions get zeros there)
        self.forward_skimmed = forward_skimmed
        self._slot = {loc: i for i, loc in enumerate(locations)}
        #: while :func:`transkimmer_budget_steps` traces: each skimmable token's keep margin
        #: ``logit_keep − logit_skip`` at each predictor (inference)
        self.trace: list[torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["trace"] = None  # per-forward: a copy of the model does not carry a trace along
        return state

    # --- entry points ------------------------------------------------------------------------
    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        dropping = not self.predictors.training and self.config.eval_mode == "drop"
        if dropping and torch.compiler.is_exporting():
            raise RuntimeError(
                "torch.export cannot take Transkimmer at inference: it keeps a data-dependent number of tokens "
                "(those its predictors keep), and an exported graph needs token counts fixed at export time. "
                "Export with Transkimmer removed (vleff.remove_transkimmer) or with eval_mode='mask'"
            )
        scratch: dict[str, Any] = {"masks": [], "num_input": x.shape[1], "masked": False}
        if dropping and self.forward_skimmed:
            scratch["out"] = x
            pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
            state.register(POSITION, pos, "min")
        state.scratch[HOOK_NAME] = scratch
        return x

    def attention_keep(self, state: TokenState) -> torch.Tensor | None:
        """Training: the keep mask as soft keep weights (the keep-masked softmax, differentiable in
        the mask: the predictors learn through it; it spreads an epsilon of 1e-6 over all keys)."""
        scratch = state.scratch.get(HOOK_NAME)
        if not self.predictors.training or scratch is None or not scratch["masked"]:
            return None
        return state.get(KEEP)

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        """Inference, where samples of the batch differ: ``−inf`` on the keys a sample skims (each
        token still sees itself), so a sample computes exactly what it computes alone."""
        scratch = state.scratch.get(HOOK_NAME)
        if self.predictors.training or scratch is None or not scratch["masked"]:
            return None
        keep = state.get(KEEP)
        n = keep.shape[1]
        hidden = (keep[:, None, :] <= 0) & ~torch.eye(n, dtype=torch.bool, device=keep.device)
        return torch.zeros(hidden.shape, dtype=dtype, device=keep.device).masked_fill(hidden, float("-inf"))[:, None]

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        scratch = state.scratch[HOOK_NAME]
        slot = self._slot.get(info.index)
        if slot is not None:
            x = self._decide(x, slot, state, scratch)
        if scratch["masked"]:  # skimmed tokens will keep the state they enter this block with
            scratch["x_in"] = x
        return x

    def _decide(self, x: torch.Tensor, slot: int, state: TokenState, scratch: dict[str, Any]) -> torch.Tensor:
        p = state.num_prefix
        prev = state.get(KEEP)
        logits = self.predictors.predictors[slot](x[:, p:])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
        if self.predictors.training:
            decision = F.gumbel_softmax(logits, tau=self.config.tau, hard=True)[..., KEEP_CHANNEL]
        else:  # deterministic: keep iff the keep probability is above keep_threshold (no Gumbel noise)
            margin = logits[..., KEEP_CHANNEL] - logits[..., SKIP_CHANNEL]
            decision = (margin > keep_margin(self.config.keep_threshold)).float()
        protected = state.get(PROTECTED)  # text towers: the EOT (BLIP: token 0), never skimmed
        if self.trace is not None and not self.predictors.training:
            skimmable = torch.ones_like(decision, dtype=torch.bool)  # the tokens this block may skim
            if protected is not None:
                skimmable &= ~protected[:, p:].bool()
            if prev is not None:
                skimmable &= prev[:, p:].bool()
            self.trace.append(margin[skimmable].detach().cpu())
        if protected is not None:
            decision = torch.maximum(decision, protected[:, p:].to(decision.dtype))
        if prev is not None:
            decision = decision * prev[:, p:].to(decision.dtype)
        mask = torch.cat([decision.new_ones(decision.shape[0], p), decision], dim=1)  # [B, N], prefix kept
        scratch["masks"].append(mask)
        if self.predictors.training:
            skim = mask.sum(dim=1).mean() / scratch["num_input"] / len(self.locations)
            state.add_aux_loss("transkimmer/skim", skim * self.config.skim_coefficient)
        if self.predictors.training or self.config.eval_mode == "mask":
            self._set_keep(state, mask)
            scratch["masked"] = True
            return x
        return self._drop(x, mask, state, scratch)

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        scratch = state.scratch[HOOK_NAME]
        x_in = scratch.pop("x_in", None)
        if x_in is not None:  # skimmed tokens keep the state they entered the block with
            m = state.get(KEEP).to(x.dtype)[..., None]
            x = x_in * (1.0 - m) + x * m
        return x

    def finish(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        scratch = state.scratch[HOOK_NAME]
        out = scratch.pop("out", None)
        if out is None:
            return x
        if x.shape[1] == out.shape[1]:  # nothing was removed: the tokens are in place
            return x
        return _put(out, state.get(POSITION), x)

    # --- inference: each sample runs its own kept tokens ------------------------------------
    def _set_keep(self, state: TokenState, mask: torch.Tensor) -> None:
        if state.get(KEEP) is None:
            state.register(KEEP, mask, "max")
        else:
            state.set(KEEP, mask)

    def _drop(self, x: torch.Tensor, mask: torch.Tensor, state: TokenState, scratch: dict[str, Any]) -> torch.Tensor:
        """Pack: each sample's kept tokens first (in sequence order), then as many of the tokens
        it skims as the sample keeping the most needs (fillers, masked, carrying their forwarded
        state); the sequence shrinks to that widest sample's count."""
        kept = mask.bool()
        width = int(kept.sum(dim=1).max())  # the most tokens a sample keeps (the prefix always)
        if width < x.shape[1]:
            if self.forward_skimmed:
                scratch["out"] = _put(scratch["out"], state.get(POSITION), x)  # the removed tokens' final states
            idx = pack_order(kept)[:, :width]
            x = state.select(x, idx)
            mask = mask.gather(1, idx)
        self._set_keep(state, mask)
        scratch["masked"] = not bool(mask.bool().all())  # some sample carries fillers: mask them
        return x


def pack_order(kept: torch.Tensor) -> torch.Tensor:
    """``[B, N]`` token order per sample: the kept tokens in sequence order, then the skimmed ones
    in sequence order (a stable sort on "skimmed")."""
    return torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices


def keep_margin(threshold: float) -> float:
    """``log(t / (1 − t))``: the keep-minus-skip logit a token must exceed to be kept at keep
    probability threshold ``t`` (``−inf`` at 0: every token kept; ``+inf`` at 1: none). At 0.5 it
    is 0, the paper's argmax. A threshold found from recorded float32 margins comes back to that
    margin to well under float32's spacing."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def keep_threshold_of(margin: float) -> float:
    """The keep probability threshold of a logit margin (the inverse of :func:`keep_margin`)."""
    if margin == -math.inf:
        return 0.0
    if margin == math.inf:
        return 1.0
    return 1.0 / (1.0 + math.exp(-margin)) if margin >= 0 else math.exp(margin) / (1.0 + math.exp(margin))


def _put(out: torch.Tensor, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` with ``x``'s tokens written at their input ``positions`` (``[B, K]``)."""
    index = positions[..., None].expand(-1, -1, x.shape[-1])
    return out.scatter(1, index, x.to(out.dtype))


def predictor_parameters(dim: int) -> int:
    """Parameters of one skim predictor: two LayerNorms (``4d``), ``Linear(d, d)`` (``d² + d``),
    ``Linear(d, 2)`` (``2d + 2``)."""
    return dim * dim + 7 * dim + 2


def _tower_locations(cfg: TranskimmerConfig, tower: TowerAdapter) -> list[int]:
    depth = len(tower.blocks())
    if cfg.locations is None:
        return list(range(depth))
    return check_locations("locations", cfg.locations, depth)


def _check_prefix(tower: TowerAdapter) -> None:
    if tower.num_prefix_tokens < 1:
        raise TypeError(
            f"Transkimmer on {tower.describe()}: it protects the class token (never skimmed), and this tower "
            "has none; a sample could skim every token"
        )


def apply_transkimmer(model: nn.Module, config: TranskimmerConfig | None = None, **settings: Any) -> nn.Module:
    """Add skim predictors to every tower of ``model`` that ``towers`` names (in place).

    Raises:
        ValueError: naming the bad setting (``locations`` outside the tower ...).
        TypeError: a tower without a class token.

    Returns:
        ``model``. Applying twice replaces the earlier predictors (drawn anew).
    """
    cfg = TranskimmerConfig.build(config, **settings)
    towers = select_towers(model, cfg.towers)
    plans = {}
    refuse_causal_decoder_towers(model, towers, "Transkimmer", f"towers={cfg.towers!r}")
    for tower in towers:  # every tower checked before any changes
        if tower.modality == "image":
            _check_prefix(tower)
        plans[id(tower.root)] = _tower_locations(cfg, tower)
    if hooks_named(model, HOOK_NAME):
        remove_transkimmer(model)
    made: dict[int, TranskimmerHook] = {}

    def make_hook(tower: TowerAdapter) -> TranskimmerHook:
        locs = plans[id(tower.root)]
        param = next(tower.root.parameters())
        predictors = TranskimmerPredictors(tower.embed_dim, len(locs), cfg.init_bias)
        predictors = predictors.to(device=param.device, dtype=param.dtype).train(tower.root.training)
        hook = TranskimmerHook(predictors, locs, cfg, forward_skimmed=tower.modality == "image")
        made[id(tower.root)] = hook
        return hook

    chosen = install_hooks(model, make_hook, cfg.towers)  # refuses (a conflict) before attaching any
    for tower in chosen:  # the predictors join the model once every hook is in
        setattr(tower.root, MODULE_NAME, made[id(tower.root)].predictors)
    return model


def remove_transkimmer(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_transkimmer`: drop the hooks and the predictors."""
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"Transkimmer is not applied to this {type(model).__name__}; nothing to remove")
    for tower in find_towers(model):
        if MODULE_NAME in tower.root._modules:
            delattr(tower.root, MODULE_NAME)
    return model


#: settings an applied Transkimmer may change (the others shape the predictors or the towers)
UPDATABLE = ("skim_coefficient", "tau", "eval_mode", "keep_threshold")


def update_transkimmer(model: nn.Module, **changes: Any) -> None:
    """Change ``skim_coefficient``, ``tau``, ``eval_mode`` or ``keep_threshold`` of an applied Transkimmer (the
    predictors are kept); the other settings need :func:`apply_transkimmer` again."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"Transkimmer is not applied to this {type(model).__name__}; call apply_transkimmer first")
    fixed = sorted(k for k in changes if k not in UPDATABLE)
    if fixed:
        raise ValueError(
            f"Transkimmer: {fixed} cannot change on an applied model (update may change {', '.join(UPDATABLE)}); "
            "apply it again"
        )
    new = hooks[0].config.replace(**changes)
    for hook in hooks:
        hook.config = new


def transkimmer_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def transkimmer_predictors(model: nn.Module) -> list[TranskimmerPredictors]:
    """The predictor modules, one per patched tower."""
    return [h.predictors for h in hooks_named(model, HOOK_NAME)]


def skim_probability(init_bias: float) -> float:
    """P(skip) of a new predictor in training, ignoring the 0.02 noise: ``1 / (1 + e^{2b})``."""
    return 1.0 / (1.0 + math.exp(2.0 * init_bias))


def transkimmer_budget_steps(model: nn.Module, batches: list[Any], forward: Any) -> list[dict[str, Any]]:
    """Keep thresholds from keeping every token (0) to skimming every token the predictors may (1),
    one between each two neighbouring keep margins the predictors give on ``batches``:
    :attr:`vleff.registry.Budget.steps`. Traced at threshold 0 (nothing skimmed), so each token
    has a margin at every predictor. A skimmed token changes the states (and margins) of the
    tokens after it, so the steps are where the FLOPs change *to first order*; the search
    measures each step it takes, and the fit is the measured one."""
    from vleff.budget import run_batches, thresholds_between

    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"Transkimmer is not applied to this {type(model).__name__}; call apply_transkimmer first")
    before = hooks[0].config
    for hook in hooks:
        hook.trace = []
        hook.config = before.replace(keep_threshold=0.0)
    try:
        run_batches(model, batches, forward)
        # thresholds_between counts down from "nothing passes" to "everything passes"; a margin
        # *passing* here means being skimmed, so walk the negated margins
        margins = [-float(m) for hook in hooks for t in hook.trace or [] for m in t.tolist()]
    finally:
        for hook in hooks:
            hook.trace = None
            hook.config = before
    cuts = thresholds_between(margins, low=-math.inf, high=math.inf)
    return [{"keep_threshold": keep_threshold_of(-c)} for c in cuts]
