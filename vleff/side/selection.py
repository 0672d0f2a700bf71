"""What the selective fine-tuning methods share (BitFit, FishMask, Child-Tuning, Xattn): which
backbone parameters train, the empirical Fisher information, global top-k masks and the masked
optimizer step. This module names no method (a shared layer); each method's folder says *which*
parameters it selects and passes its own name.

Selective methods add no module and change no forward: they choose what trains.

* **Whole tensors** (BitFit's biases, Xattn's cross-attention): :func:`select_parameters` sets
  ``requires_grad`` on the chosen tensors (and a timm head), freezes the rest of the model,
  records the flags as they were and attaches the input-gradient hooks of
  :mod:`vleff.backbones.input_grads` (a frozen block's inside gets gradients under re-entrant
  checkpointing only through them); :func:`release_parameters` undoes it exactly.
* **Entries of tensors** (FishMask, Child-Tuning): a boolean mask per parameter in the record
  (a plain attribute of the model: it deep-copies and pickles), or Child-Tuning_F's fresh
  Bernoulli draw per step, applied to the gradients by :func:`mask_gradients` after the backward
  and before the optimizer reads them: in plain PyTorch loops by an optimizer step pre-hook
  (:func:`attach_masked_step`), under Lightning in ``on_before_optimizer_step``
  (:mod:`vleff.lightning.selection`; Lightning runs the backward inside ``optimizer.step``, after
  its pre-hooks). The Fisher scores come from :func:`fisher_information`: squared gradients of a
  loss, per sample or per batch, summed; Child-Tuning_D's one joint threshold is
  :func:`percentile_masks`, FishMask's global top-k :func:`top_k_masks`.

Why the masked step restores the frozen entries (``keep_unselected=True``): a gradient mask
alone keeps Adam's moments of a masked entry at zero, but the optimizer's weight decay (AdamW's
decoupled ``p ← p·(1 − lr·wd)``, or Adam's coupled ``g + wd·p``) still moves it. FishMask's
guarantee is that only the selected entries change, whatever the optimizer, so the step
restores the others from a copy taken just before it (transient: one copy of the masked
tensors during ``optimizer.step``). Child-Tuning is a regulariser whose reference decays every
entry: it masks gradients only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from vleff.backbones import TowerAdapter, find_towers
from vleff.backbones.input_grads import attach_input_grads, detach_input_grads
from vleff.backbones.sharding import is_dtensor, placed_like
from vleff.tokens.common import select_towers

#: the model attribute holding a selective method's record: ``{"method", "label", "flags",
#: "hooks", "settings", "towers", "trainable" (names), "masks" (name -> bool tensor, or None
#: while a Fisher selection is pending), "bernoulli" (Child-Tuning_F's keep probability or
#: None), "masked" (names the masks cover), "keep_unselected", "seed", "step"}``
STATE_ATTR = "_vleff_selection"
#: the tag each selected tower's root carries (the method's name), so the method is found applied
#: from any module holding one of its towers, not only from the module it was applied to
TOWER_TAG = "_vleff_selection_method"


def chosen_towers(model: nn.Module, towers: str) -> list[TowerAdapter]:
    return select_towers(model, towers)


def tower_parameters(model: nn.Module, towers: list[TowerAdapter]) -> dict[str, nn.Parameter]:
    """``{full name: parameter}`` of every parameter that belongs to the towers (names relative
    to ``model``), in ``model.named_parameters()`` order, each once. A tower's root may hold
    another tower (open_clip's text tower is the whole ``CLIP``): the other tower's parameters
    are not this one's."""
    everything = find_towers(model)
    inside: set[int] = set()
    for t in towers:
        below = {id(m) for m in t.root.modules()}
        nested = [u for u in everything if u.root is not t.root and id(u.root) in below]
        others = {id(p) for u in nested for p in u.root.parameters()}
        inside |= {id(p) for p in t.root.parameters() if id(p) not in others}
    return {n: p for n, p in model.named_parameters() if id(p) in inside}


def head_parameters(model: nn.Module, towers: list[TowerAdapter]) -> dict[str, nn.Parameter]:
    """``{full name: parameter}`` of the towers' classifier heads (timm's ``head``)."""
    ids = {id(p) for t in towers if t.classifier_head() is not None for p in t.classifier_head().parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def block_parameters(model: nn.Module, towers: list[TowerAdapter]) -> dict[str, nn.Parameter]:
    """``{full name: parameter}`` inside the towers' blocks (Child-Tuning_D's masked set: the
    reference's ``"layer"`` name filter)."""
    ids = {id(p) for t in towers for b in t.blocks() for p in b.parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def holder(model: nn.Module, method: str | None = None) -> nn.Module | None:
    """The module inside ``model`` (``model`` first) a selective ``method`` (any when ``None``)
    was applied to, or ``None``."""
    for module in model.modules():
        record = module.__dict__.get(STATE_ATTR)
        if record is not None and (method is None or record["method"] == method):
            return module
    return None


def record_of(model: nn.Module, method: str | None = None) -> dict[str, Any] | None:
    found = holder(model, method)
    return None if found is None else found.__dict__[STATE_ATTR]


def select_parameters(
    model: nn.Module,
    method: str,
    label: str,
    towers: list[TowerAdapter],
    trainable: Iterable[str] | None,
    settings: Mapping[str, Any],
    train_head: bool = True,
) -> nn.Module:
    """Train exactly ``trainable`` (full names; ``None``: leave every flag as it is — Child-Tuning
    updates the whole model) and the towers' heads with ``train_head``; everything else of
    ``model`` is frozen, except other vleff methods' own modules (``vleff_*``). Records the
    flags as they were and attaches the input-gradient hooks; :func:`release_parameters` undoes it."""
    if holder(model) is not None:
        other = record_of(model)
        raise ValueError(
            f"cannot apply {method} while {other['method']} is applied: both choose which backbone parameters "
            "train; remove it first"
        )
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names: list[str] | None = None
    if trainable is not None:
        chosen = set(trainable)
        if train_head:
            chosen |= set(head_parameters(model, towers))
        for name, p in model.named_parameters():
            if name in chosen:
                p.requires_grad_(True)
            elif "vleff_" not in name:
                p.requires_grad_(False)
        names = [n for n in flags if n in chosen]
    record = {
        "method": method,
        "label": label,
        "flags": flags,
        "hooks": attach_input_grads(towers) if trainable is not None else [],
        "settings": dict(settings),
        "towers": frozenset(t.modality for t in towers),
        "trainable": names,
        "masks": None,
        "masked": [],
        "bernoulli": None,
        "keep_unselected": False,
        "seed": 0,
        "step": 0,
    }
    object.__setattr__(model, STATE_ATTR, record)  # a plain attribute: deep-copies and pickles with the model
    for tower in towers:
        tower.root.__dict__[TOWER_TAG] = method
    return model


def selected_in(model: nn.Module, method: str) -> bool:
    """Whether ``method`` is applied to ``model``, a submodule of it, or a module above it
    holding one of its towers."""
    return holder(model, method) is not None or any(m.__dict__.get(TOWER_TAG) == method for m in model.modules())


def release_parameters(model: nn.Module, method: str, label: str) -> nn.Module:
    """Undo :func:`select_parameters`: the flags as they were, the input hooks and record gone."""
    target = holder(model, method)
    if target is None:
        where = "; it was applied to a module holding this one: remove it there" if selected_in(model, method) else ""
        raise ValueError(f"{label} is not applied to this {type(model).__name__}; nothing to remove{where}")
    record = target.__dict__.pop(STATE_ATTR)
    for module in target.modules():
        module.__dict__.pop(TOWER_TAG, None)
    detach_input_grads(record["hooks"])
    for name, p in target.named_parameters():
        if name in record["flags"]:
            p.requires_grad_(record["flags"][name])
    return model


def applied_settings(model: nn.Module, method: str) -> dict[str, Any]:
    """``method``'s settings as applied (``towers``: the set of modalities carrying it)."""
    record = record_of(model, method)
    if record is None:
        return {}
    return {**{k: v for k, v in record["settings"].items() if k != "towers"}, "towers": record["towers"]}


def trainable_parameters(model: nn.Module, method: str) -> list[nn.Parameter]:
    """The parameters that train under ``method`` (empty when it is not applied)."""
    target = holder(model, method)
    return [] if target is None else [p for p in target.parameters() if p.requires_grad]


def ranked_parameters(model: nn.Module, method: str, label: str) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The holder of ``method``'s record and the parameters its Fisher selection ranks (the
    record's ``masked`` names), for a selection about to run. ``ValueError`` when ``method`` is
    not applied."""
    target = holder(model, method)
    if target is None:
        raise ValueError(f"{label} is not applied to this {type(model).__name__}; apply_{method} first")
    params = dict(target.named_parameters())
    return target, {n: params[n] for n in target.__dict__[STATE_ATTR]["masked"]}


def trainable_state_dict(model: nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The state of every parameter that trains (keys relative to ``model``): what a
    trainable-only checkpoint keeps of the selected model."""
    if holder(model, method) is None:
        raise ValueError(f"{method} is not applied to this {type(model).__name__}")
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def frozen_keys(model: nn.Module) -> set[str]:
    """``state_dict`` keys of frozen parameters of every module a selective method was applied
    to: what a trainable-only checkpoint leaves out."""
    frozen: set[str] = set()
    for prefix, module in model.named_modules():
        if STATE_ATTR not in module.__dict__:
            continue
        head = f"{prefix}." if prefix else ""
        frozen |= {head + n for n, p in module.named_parameters() if not p.requires_grad}
    return frozen


# --- the Fisher information and masks -----------------------------------------------------------------


def split_batch(batch: Any) -> list[Any]:
    """One batch as a list of single-sample batches (tensors sliced along dim 0, kept as batches
    of one; tuples, lists and dicts followed; anything else repeated). ``ValueError`` when the
    tensors disagree on the batch size or there is none."""
    sizes: set[int] = set()

    def collect(x: Any) -> None:
        if torch.is_tensor(x) and x.dim() > 0:
            sizes.add(x.shape[0])
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)
        elif isinstance(x, Mapping):
            for v in x.values():
                collect(v)

    collect(batch)
    if len(sizes) != 1:
        raise ValueError(
            "per-sample Fisher: the batch's tensors must share one batch size (dim 0), found "
            f"{sorted(sizes) or 'none'}; "
            "pass per_sample=False for a per-batch estimate"
        )

    def take(x: Any, i: int) -> Any:
        if torch.is_tensor(x) and x.dim() > 0:
            return x[i : i + 1]
        if isinstance(x, tuple):
            return type(x)(*[take(v, i) for v in x]) if hasattr(x, "_fields") else tuple(take(v, i) for v in x)
        if isinstance(x, list):
            return [take(v, i) for v in x]
        if isinstance(x, Mapping):
            return type(x)({k: take(v, i) for k, v in x.items()})
        return x

    return [take(batch, i) for i in range(sizes.pop())]


def fisher_information(
    params: Mapping[str, nn.Parameter],
    loss_fn: Callable[[Any], torch.Tensor],
    batches: Iterable[Any],
    per_sample: bool = True,
    max_grad_norm: float | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """The empirical Fisher information of ``params``: ``Σ_units (∂ loss(unit) / ∂θ)²`` over
    every unit of ``batches`` — each sample (``per_sample``: FishMask's reference, a batch-size-1
    loader) or each batch as it comes (Child-Tuning_D's reference). With ``max_grad_norm``
    each parameter's gradient is clipped to that norm before squaring (Child-Tuning_D's
    reference). Gradients by ``torch.autograd.grad``: ``.grad`` is left untouched.

    Returns ``(scores, units)``: the sums (same dtype and shape as each parameter) and how many
    units were summed (divide for the mean; the ranking does not change).

    Raises:
        ValueError: no batch (a Fisher selection needs data).
    """
    names = list(params)
    tensors = [params[n] for n in names]
    scores = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in zip(names, tensors)}
    sharded = any(is_dtensor(p) for p in tensors)
    units = 0
    for batch in batches:
        for unit in split_batch(batch) if per_sample else [batch]:
            loss = loss_fn(unit)
            grads = _sharded_grads(loss, tensors) if sharded else torch.autograd.grad(loss, tensors, allow_unused=True)
            for name, g in zip(names, grads):
                if g is None:
                    continue
                if max_grad_norm is not None:
                    g = g * (max_grad_norm / (g.norm() + 1e-6)).clamp(max=1.0)
                scores[name] += g.detach().square()
            units += 1
    if units == 0:
        raise ValueError("batches: the Fisher selection got no batch; pass at least one batch of training data")
    if sharded:  # the ranking is over every entry: each rank gathers the whole scores, once
        scores = {n: s.full_tensor() if is_dtensor(s) else s for n, s in scores.items()}
    return scores, units


def _sharded_grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """The gradients of ``loss`` for parameters sharded by FSDP2 (``DTensor``): its backward hooks,
    not autograd edges, carry a gradient from the gathered weights to the shards, so this runs
    ``loss.backward()`` (every rank on the same unit: the averaged shard gradient is that unit's)
    and reads ``.grad``, leaving these parameters' ``.grad`` as it found it (other trainable
    parameters get the unit's gradient too: zero them before training, as an optimizer step does)."""
    stashed = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    try:
        loss.backward()
        grads = [t.grad for t in tensors]
    finally:
        for t, g in zip(tensors, stashed):
            t.grad = g
    return grads


def top_k_masks(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Boolean masks keeping exactly the ``k`` largest scores over all tensors together (one
    global ranking, ties broken by ``torch.topk``)."""
    total = sum(s.numel() for s in scores.values())
    if not 0 <= k <= total:
        raise ValueError(f"k={k}: the masks can keep 0 to {total} entries")
    flat = torch.cat([s.detach().flatten().float() for s in scores.values()])
    keep = torch.zeros(total, dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, k).indices] = True
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view(s.shape).to(s.device)
        start += s.numel()
    return masks


def set_masks(model: nn.Module, method: str, masks: Mapping[str, torch.Tensor], freeze_empty: bool = True) -> None:
    """Store fixed ``masks`` (name -> bool tensor) in ``method``'s record; with the record's
    ``keep_unselected`` (FishMask), a parameter with no selected entry stops requiring grad, unless
    ``freeze_empty=False``: then every masked parameter requires grad (its gradient is masked to
    zero and its entries put back after the step). Data-parallel training needs that: DDP's
    reducer was built, before the selection, on the parameters requiring grad then, and a
    parameter that stops getting a gradient fails its step ("parameters that were not used");
    under FSDP2 a sharded checkpoint must hold state for every parameter the resumed run's
    optimizer (built before the selection is restored) starts with."""
    record = record_of(model, method)
    if record is None:
        raise ValueError(f"{method} is not applied to this {type(model).__name__}")
    params = dict(holder(model, method).named_parameters())
    for name, mask in masks.items():
        if name not in params or tuple(mask.shape) != tuple(params[name].shape):
            raise ValueError(f"masks: {name!r} is not a parameter of this model with shape {tuple(mask.shape)}")
    record["masks"] = {n: m.to(torch.bool).detach().clone() for n, m in masks.items()}
    if record["keep_unselected"]:
        for name, mask in record["masks"].items():
            params[name].requires_grad_(bool(mask.any()) or not freeze_empty)


def masks_of(model: nn.Module, method: str) -> dict[str, torch.Tensor] | None:
    record = record_of(model, method)
    return None if record is None else record["masks"]


def _bernoulli_masks(record: dict[str, Any], params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Child-Tuning_F: a fresh Bernoulli(p) mask per parameter, drawn from generators seeded by
    the record's seed and step (one generator per device, the parameters drawn in the record's
    order, a parameter without a gradient drawn too), so every DDP rank draws the same masks and a
    resumed run the same as an uninterrupted one, whatever the global RNG did meanwhile. The draw
    depends on the device type (a CPU and a CUDA generator give different streams)."""
    p = record["bernoulli"]
    seed = record["seed"] * 1_000_003 + record["step"]
    generators: dict[torch.device, torch.Generator] = {}
    out = {}
    for name in record["masked"]:
        param = params[name]
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        out[name] = torch.rand(param.shape, generator=generators[param.device], device=param.device) < p
    return out


def percentile_masks(scores: Mapping[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the scores at or above **one joint threshold**, the ``(1 − keep)``
    percentile of all scores together with linear interpolation between order statistics
    (numpy's default ``np.percentile``, as Child-Tuning_D's reference computes it). With distinct
    scores that keeps ``n − ⌈(1 − keep)(n − 1)⌉`` of ``n`` entries; ties at the threshold are all
    kept (a model whose scores are mostly zero keeps every zero when the threshold is zero)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r}: the fraction of entries kept must be in (0, 1]")
    flat = torch.cat([s.detach().flatten().double() for s in scores.values()])
    if flat.numel() == 0:
        raise ValueError("scores: no entry to rank")
    position = (1.0 - keep) * (flat.numel() - 1)
    low = int(position)  # floor: position >= 0
    ordered = torch.sort(flat).values
    high = min(low + 1, flat.numel() - 1)
    threshold = ordered[low] + (position - low) * (ordered[high] - ordered[low])
    return {name: s.detach().double() >= threshold for name, s in scores.items()}


def mask_gradients(model: nn.Module, advance: bool = False) -> dict[str, torch.Tensor]:
    """Multiply the ``.grad`` of every masked parameter of the selective method applied to
    ``model`` by its mask (Child-Tuning_F: a fresh Bernoulli mask, the kept entries scaled by
    ``1/p``; ``advance`` moves to the next step's draw afterwards). Returns the masks used.

    Raises:
        RuntimeError: a Fisher selection that was never computed (no batches yet).
    """
    target = holder(model)
    if target is None:
        return {}
    record = target.__dict__[STATE_ATTR]
    params = dict(target.named_parameters())
    if record["bernoulli"] is not None:
        masks = _bernoulli_masks(record, params)
        scale = 1.0 / record["bernoulli"]
        for name, mask in masks.items():
            g = params[name].grad
            if g is not None:
                g.mul_(placed_like(mask.to(g.dtype), g)).mul_(scale)  # one rounding of g / p, also in bf16
        if advance:
            record["step"] += 1
        return masks
    masks = record["masks"]
    if masks is None and not record["masked"]:  # whole tensors only (BitFit, Xattn): nothing to mask
        return {}
    if masks is None:
        raise RuntimeError(
            f"{record['label']} has no mask yet: its Fisher selection needs batches of training data "
            f"(vleff.select_{record['method']}(model, batches, loss_fn), or the callback at fit start)"
        )
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(placed_like(mask.to(g.dtype), g))
    if advance:
        record["step"] += 1
    return masks


def attach_masked_step(optimizer: torch.optim.Optimizer, model: nn.Module, mask: bool = True) -> list[Any]:
    """Make ``optimizer.step`` honour the selective method applied to ``model``: before the step
    the gradients are masked (:func:`mask_gradients`, advancing Child-Tuning_F's draw); with
    ``keep_unselected`` (FishMask) the masked-off entries are put back after the step, so neither
    weight decay nor momentum moves them. Returns the hook handles (``handle.remove()`` each, or
    :func:`detach_masked_step`).

    ``mask=False`` leaves the masking to the caller (the Lightning callbacks mask in
    ``on_before_optimizer_step``): when ``optimizer.step(closure)`` runs the backward inside the
    step, as Lightning's automatic optimisation does, a step pre-hook runs *before* that backward
    and would mask the previous (or a partly accumulated) gradient instead of this step's."""
    saved: dict[str, torch.Tensor] = {}

    def before(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        target = holder(model)
        if target is None:
            return
        record = target.__dict__[STATE_ATTR]
        if mask:
            mask_gradients(model, advance=True)
        saved.clear()
        if record["keep_unselected"] and record["masks"] is not None:
            params = dict(target.named_parameters())
            for name in record["masks"]:
                if params[name].requires_grad:
                    saved[name] = params[name].detach().clone()

    def after(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        target = holder(model)
        if target is None or not saved:
            return
        record = target.__dict__[STATE_ATTR]
        params = dict(target.named_parameters())
        with torch.no_grad():
            for name, before_step in saved.items():
                p = params[name]
                p.copy_(torch.where(placed_like(record["masks"][name], p), p, before_step))
        saved.clear()

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def detach_masked_step(handles: Iterable[Any]) -> None:
    for handle in handles:
        handle.remove()


def selection_state(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint must hold to resume a selective method exactly: the method, its fixed
    masks (or ``None``) and the step of Child-Tuning_F's draws."""
    record = record_of(model)
    if record is None:
        return None
    masks = None if record["masks"] is None else {n: m.cpu() for n, m in record["masks"].items()}
    return {"method": record["method"], "masks": masks, "step": record["step"], "seed": record["seed"]}


def load_selection_state(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Put :func:`selection_state`'s ``state`` back (``ValueError`` for another method)."""
    record = record_of(model)
    if record is None or record["method"] != state["method"]:
        have = None if record is None else record["method"]
        raise ValueError(f"the checkpoint holds {state['method']}'s selection, but this model has {have!r} applied")
    if state["masks"] is not None:
        params = dict(holder(model).named_parameters())
        set_masks(model, record["method"], {n: m.to(params[n].device) for n, m in state["masks"].items()})
    record["step"], record["seed"] = state["step"], state["seed"]


__all__ = [
    "STATE_ATTR",
    "applied_settings",
    "attach_masked_step",
    "block_parameters",
    "chosen_towers",
    "detach_masked_step",
    "fisher_information",
    "frozen_keys",
    "head_parameters",
    "holder",
    "load_selection_state",
    "mask_gradients",
    "masks_of",
    "percentile_masks",
    "record_of",
    "release_parameters",
    "select_parameters",
    "selected_in",
    "selection_state",
    "set_masks",
    "split_batch",
    "top_k_masks",
    "tower_parameters",
    "trainable_state_dict",
]
