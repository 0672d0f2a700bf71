"""DynamicViT (Rao et al., NeurIPS 2021): learned token pruning on every supported image tower.

Image towers only (``towers="image"``): its predictors score the whole sequence at once, so
on a causal text tower an earlier position's output would depend on later tokens; text
towers, causal encoders and decoders alike, are not offered.

Small prediction modules sit in front of chosen blocks (default three evenly spaced ones,
``(3, 6, 9)`` for 12 blocks) with hierarchical keep ratios ``ρ, ρ², ρ³``.

* **Training** (module in train mode): each predictor scores the non-prefix tokens; a hard
  Gumbel-softmax sample, multiplied by the previous stage's decision (masks only shrink),
  becomes ``state.keep``. Tokens stay in place; the generic block masks attention so dropped
  tokens receive none (each still attends to itself), which keeps the batch rectangular and
  the decisions differentiable (straight-through). Prefix tokens (cls, dist, registers) are
  always kept.
* **Evaluation**: the ``⌊N₀·ratio⌋`` best-scoring tokens are really kept (``N₀`` = patch tokens
  entering the tower), in their original order; the block and all later ones run on fewer
  tokens. ``eval_mode="mask"`` instead computes the same decisions as masks (the training
  computation made deterministic), which the tests use to check that both agree.
* **Losses** (recorded as aux losses, see :mod:`vleff.tokens.aux`): ``ratio_weight · mean_s
  mean_b (mean keep − ρ_s)²``; with a teacher (a frozen copy of the model made before surgery)
  ``kl_weight · KL(teacher ‖ student)`` on the logits and ``token_weight · MSE`` between the
  last block's output tokens that the final stage keeps. The token features are compared after
  a parameter-free LayerNorm (the paper compares the final-normed tokens; towers name their
  final norm differently and some apply it after pooling).

The predictors are an ``nn.Module`` registered on each tower root as ``vleff_dynamicvit`` so
they are trained by ``model.parameters()`` and saved in ``state_dict``: to load such a
checkpoint, call :func:`apply_dynamicvit` on the fresh model first. The teacher is held outside
the module tree (not in ``parameters()``/``state_dict``, never updated) and follows the
student's device and dtype on first use. Low keep ratios are known to give NaN losses
without gradient clipping: use ``Trainer(gradient_clip_val=1.0)`` or similar.

>>> vleff.apply_dynamicvit(model, rho=0.7)                       # training: add vleff_aux_loss(model)
>>> vleff.remove_dynamicvit(model)
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import (
    BlockInfo,
    TokenState,
    TowerAdapter,
    TowerHook,
    find_towers,
    patch_tower,
)
from vleff.checks import (
    check_bool,
    check_choice,
    check_number,
    check_ratio,
    check_towers,
)
from vleff.registry import MethodConfig
from vleff.tokens.common import hooks_named, install_hooks, remove_hooks
from vleff.tokens.pruning import check_locations, count_for_ratio, keep_indices

HOOK_NAME = "dynamicvit"
CAPTURE_HOOK = "dynamicvit_teacher_capture"
MODULE_NAME = "vleff_dynamicvit"
DISTILLER_ATTR = "_vleff_dynamicvit_distiller"
KEEP = "keep"
EvalMode = Literal["drop", "mask"]
TOWERS = ("image",)


@dataclass
class DynamicViTConfig(MethodConfig):
    """DynamicViT's settings.

    Attributes:
        rho: base keep ratio in (0, 1]; stage ``s`` keeps ``rho**(s+1)`` of the patch tokens.
        locations: block indices (strictly increasing) in front of which predictors decide;
            ``None``: three evenly spaced blocks, ``(3, 6, 9)`` for 12 blocks.
        keep_ratios: explicit per-stage ratios in (0, 1], non-increasing (overrides ``rho``).
        distill: keep a frozen copy of the model (as it is at apply time) as teacher for the
            KL and token losses.
        ratio_weight, kl_weight, token_weight: loss weights (paper: 2.0, 0.5, 0.5).
        logits_fn: output -> logits for the KL loss (default :func:`default_logits`).
        eval_mode: ``"drop"`` (real pruning, the fast path) or ``"mask"`` (decisions as masks).
        towers: ``"image"``.
    """

    method = "dynamicvit"
    rho: float = 0.7
    locations: Sequence[int] | None = None
    keep_ratios: Sequence[float] | None = None
    distill: bool = True
    ratio_weight: float = 2.0
    kl_weight: float = 0.5
    token_weight: float = 0.5
    logits_fn: Callable[[Any], torch.Tensor] | None = None
    eval_mode: str = "drop"
    towers: str = "image"

    def __post_init__(self) -> None:
        self.rho = check_ratio("rho", self.rho)
        if self.keep_ratios is not None:
            if isinstance(self.keep_ratios, (str, bytes)) or not isinstance(self.keep_ratios, Sequence):
                raise ValueError(
                    f"keep_ratios={self.keep_ratios!r} is not allowed; it must be a sequence of numbers in (0, 1]"
                )
            ratios = [check_ratio(f"keep_ratios[{i}]", r) for i, r in enumerate(self.keep_ratios)]
            if any(b > a for a, b in zip(ratios, ratios[1:])):
                raise ValueError(
                    f"keep_ratios={ratios!r} is not allowed; it must be non-increasing (masks only shrink)"
                )
            self.keep_ratios = ratios
        if self.locations is not None:
            self.locations = check_locations("locations", self.locations, 10_000)
            if self.keep_ratios is not None and len(self.keep_ratios) != len(self.locations):
                raise ValueError(
                    f"keep_ratios has {len(self.keep_ratios)} entries but there are "
                    f"{len(self.locations)} locations {self.locations}"
                )
        check_bool("distill", self.distill)
        for name in ("ratio_weight", "kl_weight", "token_weight"):
            setattr(self, name, check_number(name, getattr(self, name), low=0))
        if self.logits_fn is not None and not callable(self.logits_fn):
            raise ValueError(f"logits_fn={self.logits_fn!r} is not allowed; pass a callable (output -> logits) or None")
        check_choice("eval_mode", self.eval_mode, ("drop", "mask"))
        check_towers(self.towers, TOWERS)


class Predictor(nn.Module):
    """Scores tokens from their own features and a policy-weighted mean of all kept tokens.

    ``LayerNorm → Linear(C, C) → GELU``; the first half of the channels stays per token, the
    second half is averaged over kept tokens (weights = current keep policy) and broadcast;
    then ``C → C/2 → C/4 → 2`` with GELUs and a log-softmax. Output ``[..., 0]`` is the
    log-probability of keeping the token.

    ``keep_prior`` sets the last layer's bias so that a new predictor keeps about that fraction
    of the tokens it sees (the stage's ratio over the previous one's): training then starts
    at the target token counts and the ratio loss does not have to drag the keep rate there
    first, which with the straight-through Gumbel estimate takes many epochs.
    """

    def __init__(self, dim: int, keep_prior: float = 0.5) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"embed dim {dim} is too small for a DynamicViT predictor (need >= 4)")
        self.local_dim = dim // 2
        self.in_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2)
        )
        prior = min(max(float(keep_prior), 0.02), 0.98)
        with torch.no_grad():  # softmax(bias) = (prior, 1 - prior)
            self.out[-1].bias.copy_(torch.tensor([math.log(prior), math.log(1.0 - prior)]))

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, M, C]`` tokens, ``policy`` ``[B, M]`` keep weights → ``[B, M, 2]`` log-probs (float32)."""
        h = self.in_proj(x)
        w = policy.to(h.dtype)[..., None]
        local, rest = h[..., : self.local_dim], h[..., self.local_dim :]
        pooled = (rest * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        h = torch.cat([local, pooled.expand(-1, h.shape[1], -1)], dim=-1)
        return self.out(h).float().log_softmax(dim=-1)


class DynamicViTPredictors(nn.Module):
    """The predictors of one tower, registered on its root as ``vleff_dynamicvit``."""

    def __init__(self, dim: int, num_stages: int, keep_priors: Sequence[float] | None = None) -> None:
        super().__init__()
        priors = list(keep_priors) if keep_priors is not None else [0.5] * num_stages
        if len(priors) != num_stages:
            raise ValueError(f"need one keep prior per stage, got {len(priors)} for {num_stages} stages")
        self.predictors = nn.ModuleList(Predictor(dim, p) for p in priors)


def hierarchical_ratios(rho: float, num_stages: int) -> list[float]:
    """``[ρ, ρ², …]``: each stage keeps ``ρ`` of what the previous one kept."""
    return [rho ** (s + 1) for s in range(num_stages)]


class DynamicViTHook(TowerHook):
    """The DynamicViT hook of one tower.

    Decisions are made in ``before`` (at the block input, as in the paper), so the whole
    block at a location already runs on the kept tokens. In training (and ``eval_mode="mask"``)
    the decisions are the token field ``"keep"``, which :meth:`attention_keep` hands to every
    block's attention. Per forward, ``state.scratch["dynamicvit"]`` holds ``decisions``
    (``[B, N₀]`` keep masks over the non-prefix tokens, one per stage, masked mode only),
    ``kept`` (indices of the surviving tokens, drop mode) and ``tokens`` (the last block's
    output, for token distillation).
    """

    name = HOOK_NAME
    #: its decisions live in the token state (replays exactly, the Gumbel noise restored by the
    #: checkpoint's RNG state); the keep mask reaches later blocks through the state, not the
    #: block output, so its gradient to the predictors needs non-re-entrant checkpointing
    replayable = True
    side_outputs = True

    def __init__(
        self,
        predictors: DynamicViTPredictors,
        locations: list[int],
        ratios: list[float],
        ratio_weight: float,
        eval_mode: str = "drop",
    ) -> None:
        self.predictors = predictors
        self.locations = locations
        self.ratios = ratios
        self.ratio_weight = ratio_weight
        self.eval_mode = eval_mode
        self._stage = {loc: s for s, loc in enumerate(locations)}
        self.last_state: TokenState | None = None

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        state.scratch[HOOK_NAME] = {"num_patches": x.shape[1] - state.num_prefix, "decisions": []}
        self.last_state = state
        return x

    def attention_keep(self, state: TokenState) -> torch.Tensor | None:
        return state.get(KEEP)

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if info.index == info.depth - 1:
            state.scratch[HOOK_NAME]["tokens"] = x
        return x

    def before(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        stage = self._stage.get(info.index)
        if stage is None:
            return x
        scratch = state.scratch[HOOK_NAME]
        p = state.num_prefix
        predictor = self.predictors.predictors[stage]
        budget = count_for_ratio(scratch["num_patches"], self.ratios[stage], "floor")
        if self.predictors.training or self.eval_mode == "mask":
            keep = state.get(KEEP)
            if keep is None:
                prev = torch.ones(x.shape[0], x.shape[1] - p, device=x.device, dtype=torch.float32)
            else:
                prev = keep[:, p:].float()
            log_probs = predictor(x[:, p:], prev)
            if self.predictors.training:
                decision = F.gumbel_softmax(log_probs, hard=True)[..., 0] * prev
                loss = ((decision.mean(dim=1) - self.ratios[stage]) ** 2).mean()
                state.add_aux_loss("dynamicvit/ratio", loss * (self.ratio_weight / len(self.locations)))
            else:  # deterministic: the same top-k the drop mode takes, as a mask
                scores = log_probs[..., 0].masked_fill(prev <= 0, float("-inf"))
                k = min(budget, int((prev > 0).sum(dim=1).min()))
                top = scores.topk(k, dim=1).indices
                decision = torch.zeros_like(prev).scatter(1, top, 1.0)
            scratch["decisions"].append(decision)
            full = torch.cat([torch.ones_like(decision[:, :p]), decision], dim=1)
            if keep is None:
                state.register(KEEP, full, "max")
            else:
                state.set(KEEP, full)
            return x
        log_probs = predictor(x[:, p:], torch.ones(x.shape[0], x.shape[1] - p, device=x.device))
        k = min(budget, x.shape[1] - p)
        idx = keep_indices(log_probs[..., 0], k, p)
        kept = scratch.get("kept")
        scratch["kept"] = idx if kept is None else kept.gather(1, idx)
        return state.select(x, idx)


class TokenCapture(TowerHook):
    """Keeps the last block's output of a tower (the teacher's tokens for token distillation)."""

    name = CAPTURE_HOOK
    replayable = True

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None

    def after(self, x: torch.Tensor, info: BlockInfo, state: TokenState) -> torch.Tensor:
        if info.index == info.depth - 1:
            self.tokens = x
        return x


def default_logits(output: Any) -> torch.Tensor:
    """Logits from a model output: a tensor, or a ``.logits`` / ``.logits_per_image`` attribute."""
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "logits_per_image"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(
        f"DynamicViT logit distillation cannot find logits in a {type(output).__name__} output; "
        "pass logits_fn=... (output -> logits tensor) or kl_weight=0"
    )


def token_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE between student and teacher tokens ``[B, N, C]`` over the tokens with ``keep > 0.5``
    (``[B, N]``), after a parameter-free LayerNorm; 0 when no token is kept."""
    s = F.layer_norm(student.float(), student.shape[-1:])
    t = F.layer_norm(teacher.float(), teacher.shape[-1:])
    mask = (keep > 0.5).to(s.dtype)[..., None]
    # a masked mean without a data-dependent branch (torch.compile keeps one graph)
    return ((s - t) ** 2 * mask).sum() / (mask.sum() * s.shape[-1]).clamp_min(1.0)


class Distiller:
    """The frozen teacher, and the comparison of student and teacher after each training forward.

    A forward hook on the distilled module (the one :func:`apply_dynamicvit` was given) runs
    the teacher on the same inputs after every training forward of the student. The student's
    last-block tokens come from its DynamicViT hooks (``after``), the teacher's from a
    :class:`TokenCapture` hook on each teacher tower. No closures: the model stays picklable.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        hooks: list[DynamicViTHook],
        kl_weight: float,
        token_weight: float,
        logits_fn: Callable[[Any], torch.Tensor],
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.hooks = hooks
        self.kl_weight, self.token_weight, self.logits_fn = kl_weight, token_weight, logits_fn
        self.captures: list[TokenCapture] = []
        for tower in find_towers(teacher, "image")[: len(hooks)]:
            capture = TokenCapture()
            patch_tower(tower).add_hook(capture)
            self.captures.append(capture)
        self.handle = model.register_forward_hook(self._after_forward, with_kwargs=True)
        self._warned = False

    def _sync_teacher(self, model: nn.Module) -> None:
        param = next(model.parameters())
        t_param = next(self.teacher.parameters())
        if t_param.device != param.device or t_param.dtype != param.dtype:
            self.teacher.to(device=param.device, dtype=param.dtype)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not model.training or not torch.is_grad_enabled():
            return
        states = [h.last_state for h in self.hooks]
        if not states or any(s is None or not s.scratch.get(HOOK_NAME, {}).get("decisions") for s in states):
            if not self._warned:
                warnings.warn(
                    "DynamicViT distillation skipped: the training forward did not run the towers' "
                    "masked DynamicViT path (the towers were not called through this module, or the "
                    "predictors are in eval mode); the KL and token losses are not added",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned = True
            return
        self._sync_teacher(model)
        with torch.no_grad():
            self.teacher.eval()
            teacher_out = self.teacher(*args, **kwargs)
        first = states[0]
        if self.kl_weight > 0:
            first.add_aux_loss(
                "dynamicvit/kl",
                kl_teacher_student(self.logits_fn(output), self.logits_fn(teacher_out)) * self.kl_weight,
            )
        if self.token_weight > 0:
            for capture, state in zip(self.captures, states):
                scratch = state.scratch[HOOK_NAME]
                student_tokens = scratch.pop("tokens", None)
                if student_tokens is None or capture.tokens is None:
                    continue
                p = state.num_prefix
                loss = token_distillation_loss(student_tokens[:, p:], capture.tokens[:, p:], scratch["decisions"][-1])
                state.add_aux_loss("dynamicvit/token", loss * self.token_weight)
                capture.tokens = None

    def remove(self) -> None:
        self.handle.remove()


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``KL(teacher ‖ student)`` of the softmaxed logits, averaged over the batch (DynamicViT's
    logit distillation: the student matches the teacher's distribution)."""
    s = student_logits.float().log_softmax(dim=-1)
    t = teacher_logits.float().log_softmax(dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


def apply_dynamicvit(model: nn.Module, config: DynamicViTConfig | None = None, **settings: Any) -> nn.Module:
    """Add DynamicViT predictors to every image tower of ``model`` (in place).

    Args:
        model: any model holding supported image towers (timm ViT/DeiT, open_clip CLIP, Hugging
            Face CLIP/BLIP). With ``distill=True`` it is also the teacher's template and its
            ``forward`` output gives the logits, so pass the module you call in training
            (not a LightningModule: pass its backbone).
        config: a :class:`DynamicViTConfig`; ``settings`` (``rho=0.5`` ...) build or update it.

    Raises:
        ValueError: naming the bad setting (ratios outside (0, 1], bad locations ...).

    Returns:
        ``model``. Applying twice replaces the earlier predictors (and re-copies the teacher).
    """
    cfg = DynamicViTConfig.build(config, **settings)
    from vleff.tokens.common import select_towers

    towers = select_towers(model, cfg.towers)
    plans = []
    for tower in towers:  # validate every tower before changing any
        locs = check_locations("locations", cfg.locations, len(tower.blocks()))
        if cfg.keep_ratios is not None and len(cfg.keep_ratios) != len(locs):
            raise ValueError(
                f"keep_ratios has {len(cfg.keep_ratios)} entries but there are {len(locs)} locations {locs}"
            )
        plans.append(
            (locs, list(cfg.keep_ratios) if cfg.keep_ratios is not None else hierarchical_ratios(cfg.rho, len(locs)))
        )
    if hooks_named(model, HOOK_NAME):
        remove_dynamicvit(model)
    teacher = copy.deepcopy(model) if cfg.distill else None

    made: dict[int, DynamicViTHook] = {}

    def make_hook(tower: TowerAdapter) -> DynamicViTHook:
        locs, stage_ratios = plans[len(made)]
        param = next(tower.root.parameters())
        priors = [r / prev for r, prev in zip(stage_ratios, [1.0] + stage_ratios[:-1])]  # kept / seen
        predictors = DynamicViTPredictors(tower.embed_dim, len(locs), priors).to(device=param.device, dtype=param.dtype)
        predictors.train(tower.root.training)
        hook = DynamicViTHook(predictors, locs, stage_ratios, cfg.ratio_weight, cfg.eval_mode)
        hook.config = cfg
        made[id(tower.root)] = hook
        roots.append(tower.root)
        return hook

    roots: list[nn.Module] = []
    install_hooks(model, make_hook, cfg.towers)  # refuses (a conflict, checkpointing) before attaching any
    for root in roots:  # the predictors join the model once every hook is in
        setattr(root, MODULE_NAME, made[id(root)].predictors)
    if teacher is not None:
        model.__dict__[DISTILLER_ATTR] = Distiller(
            model, teacher, list(made.values()), cfg.kl_weight, cfg.token_weight, cfg.logits_fn or default_logits
        )
    return model


def update_dynamicvit(model: nn.Module, **changes: Any) -> None:
    """Change the keep ratios (``rho`` or ``keep_ratios``) of an applied DynamicViT: the token
    counts kept at inference and the ratio loss's target in training; the trained predictors
    stay (a FLOPs budget, :func:`vleff.fit_budget`, moves ``rho``)."""
    hooks = hooks_named(model, HOOK_NAME)
    if not hooks:
        raise ValueError(f"DynamicViT is not applied to this {type(model).__name__}; call apply_dynamicvit first")
    new = hooks[0].config.replace(**changes)
    for hook in hooks:
        if new.keep_ratios is not None and len(new.keep_ratios) != len(hook.locations):
            raise ValueError(
                f"keep_ratios has {len(new.keep_ratios)} entries but there are {len(hook.locations)} "
                f"locations {list(hook.locations)}"
            )
    for hook in hooks:
        n = len(hook.locations)
        hook.ratios = list(new.keep_ratios) if new.keep_ratios is not None else hierarchical_ratios(new.rho, n)
        hook.config = new


def remove_dynamicvit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_dynamicvit`: drop the hooks, the predictors and the teacher."""
    distiller = model.__dict__.pop(DISTILLER_ATTR, None)
    if distiller is not None:
        distiller.remove()
    if remove_hooks(model, HOOK_NAME) == 0:
        raise ValueError(f"DynamicViT is not applied to this {type(model).__name__}; nothing to remove")
    for tower in find_towers(model):
        if MODULE_NAME in tower.root._modules:
            delattr(tower.root, MODULE_NAME)
    return model


def dynamicvit_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def dynamicvit_teacher(model: nn.Module) -> nn.Module | None:
    """The frozen teacher of an applied DynamicViT (``None`` without distillation)."""
    distiller = model.__dict__.get(DISTILLER_ATTR)
    return distiller.teacher if distiller is not None else None


def dynamicvit_predictors(model: nn.Module) -> list[DynamicViTPredictors]:
    """The predictor modules, one per patched tower."""
    return [h.predictors for h in hooks_named(model, HOOK_NAME)]
