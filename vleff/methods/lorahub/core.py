"""LoRAHub (Huang et al., 2023): a gradient-free composition of several trained LoRA modules.

Given ``n`` LoRA modules trained on the same base model with the same targets and rank (vleff's
:func:`vleff.apply_lora` adapter state, ``vleff.methods.lora.lora_state_dict``, or a LoRA
callback's adapter-only checkpoint), LoRAHub looks for weights ``w ∈ [-1.5, 1.5]ⁿ`` and applies

    A = Σᵢ wᵢ Aᵢ,   B = Σᵢ wᵢ Bᵢ,   W' = W + (alpha / r) · B A

to every target. The sums are element-wise over the modules' state dicts (the official
``lorahub/algorithm.py: get_score`` sums the peft state dicts), so ``B A`` has the cross terms
``wᵢ wⱼ Bᵢ Aⱼ``: it is *not* ``Σ wᵢ Bᵢ Aᵢ`` (what ``peft``'s ``add_weighted_adapter`` computes).
At ``w = 0`` both factors are zero and the model is the base model exactly.

The weights minimise, without gradients, ``loss(examples) + l1 · mean |wᵢ|`` over ``budget``
evaluations of nevergrad's ``NGOpt`` on ``ng.p.Array(init=0, lower=-bound, upper=bound)`` (the
official defaults: l1 0.05, bound 1.5, budget = ``max_inference_step``, 40 in its examples).
Each evaluation is one forward pass over the few-shot examples in eval mode, under ``no_grad``.

Where the composite lives: in ``peft`` LoRA layers of rank ``r`` on the modules' targets
(:mod:`vleff.side.peft_tuners`: in place, exact removal, adapter-only state), not merged into
the base weights as the official code does at the end (``merge_and_unload``). The function is
the same (tested against the merged weights); kept as factors, :func:`remove_lorahub` gives the
library's model back bit-exactly, the base weights are never rewritten, and the composite can be
trained further (its factors train as LoRA's do; a timm head with ``train_head``).

``examples`` is either a list of ``(inputs, targets)`` batches — the loss is the cross-entropy of
``model(inputs)`` averaged over all examples — or a callable ``loss_fn(model) -> scalar`` for any
other objective (a CLIP model's contrastive loss, a captioning loss).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vleff.backbones import TowerAdapter, find_towers
from vleff.checks import check_bool, check_int, check_number
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "lorahub"
LABEL = "LoRAHub"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT, open_clip and Hugging Face CLIP towers (LoRA's targets)"
#: a LoRA factor's key in a ``peft`` state dict: ``<target path>.lora_<A|B>.<adapter name>.weight``
FACTOR_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")
#: keys of ``peft`` tuners that are LoRA plus something LoRAHub cannot sum (DoRA's magnitudes,
#: AdaLoRA's singular values and rank counts)
NOT_PLAIN_LORA = ("lora_magnitude_vector", ".lora_E.", ".ranknum.")
#: where :func:`apply_lorahub` keeps the result of its search on the model (a plain attribute)
RESULT_ATTR = "_vleff_lorahub_result"

Examples = Iterable[Any] | Callable[[nn.Module], Any]


@dataclass
class LoRAHubConfig(MethodConfig):
    """LoRAHub's settings (the official defaults).

    Attributes:
        budget: evaluations of the objective nevergrad may spend (``max_inference_step``).
        l1: weight of the L1 term ``l1 · mean |wᵢ|`` added to the few-shot loss.
        bound: the weights are searched in ``[-bound, bound]``.
        alpha: the LoRA scale numerator the modules were trained with (``alpha / r``; the adapter
            state dicts do not hold it; vleff's LoRA default is 16).
        seed: seeds nevergrad's own random state (the search is reproducible; the global NumPy
            and torch generators are not touched). ``None``: nevergrad draws it.
        weights: compose with these weights instead of searching (one per module; uniform
            averages, single modules, or a found composition applied again); ``examples`` are
            then not used and must not be given.
        train_head: keep a timm classifier head trainable (the composite factors train as LoRA's).
        reference_loss: the official loss scale, the sum of the batches' mean losses divided by
            the number of examples (for its default single batch: the mean loss / n); default
            (``False``): the mean loss per example. Only for batches, not a ``loss_fn``.
    """

    method = NAME
    budget: int = 40
    l1: float = 0.05
    bound: float = 1.5
    alpha: float = 16.0
    seed: int | None = 0
    weights: tuple[float, ...] | None = None
    train_head: bool = False
    reference_loss: bool = False

    def __post_init__(self) -> None:
        self.budget = check_int("budget", self.budget, low=1)
        self.l1 = check_number("l1", self.l1, low=0.0)
        self.bound = check_number("bound", self.bound, low=0.0, low_open=True)
        self.alpha = check_number("alpha", self.alpha, low=0.0, low_open=True)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, low=0)
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence) or not self.weights:
                raise ValueError(
                    f"weights={self.weights!r} is not allowed; use None (search) or a non-empty sequence of "
                    "finite numbers, one per module"
                )
            self.weights = tuple(check_number(f"weights[{i}]", w) for i, w in enumerate(self.weights))
        self.train_head = check_bool("train_head", self.train_head)
        self.reference_loss = check_bool("reference_loss", self.reference_loss)


@dataclass
class LoRAHubResult:
    """What :func:`apply_lorahub` found.

    Attributes:
        weights: the module weights applied (nevergrad's recommendation, or the given ones).
        loss: the few-shot loss of the composed model (``None`` when no examples were given).
        objective: ``loss + l1 · mean |w|`` (``None`` likewise).
        history: one entry per evaluation of the search, in order: ``{"weights", "loss", "objective"}``.
    """

    weights: tuple[float, ...]
    loss: float | None = None
    objective: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """The few-shot loss of each evaluation, in order (for a plot of the search)."""
        return [h["loss"] for h in self.history]


# --- the modules: loaded, checked against each other and against the model -------------------------
@dataclass(frozen=True)
class _Target:
    """One LoRA target of the model: where peft wraps it and the weight ``B A`` adds to."""

    path: str  # module path relative to the model; the factors' keys start with it
    parameter: str | None  # a bare parameter peft wraps (open_clip's in_proj_weight), else None
    shape: tuple[int, ...]  # (out, in) of the weight


def _model_targets(model: nn.Module) -> dict[str, _Target]:
    """Every LoRA target of ``model``'s towers (the per-family table of :mod:`vleff.backbones.targets`),
    by module path; ``TypeError`` naming the tower and what is supported when a tower has none."""
    towers = find_towers(model)
    if not towers:
        raise TypeError(f"{LABEL} does not support {type(model).__name__}: no tower found; it supports {SUPPORTED}")
    names = {id(m): n for n, m in model.named_modules()}
    found: dict[str, _Target] = {}
    for tower in towers:
        for block in tower.blocks():
            try:
                mods, params = tower.lora_targets(names[id(block)])
            except TypeError:
                raise tower.unsupported(LABEL, SUPPORTED) from None
            for name in (m.lstrip(".") for m in mods):
                weight = model.get_submodule(name).weight
                found[name] = _Target(name, None, tuple(weight.shape))
            for name in (p.lstrip(".") for p in params):
                path, _, attr = name.rpartition(".")
                found[path] = _Target(path, attr, tuple(getattr(model.get_submodule(path), attr).shape))
    return found


def _tower_of(model: nn.Module, path: str) -> TowerAdapter | None:
    names = {id(m): n for n, m in model.named_modules()}
    for tower in find_towers(model):
        root = names[id(tower.root)]
        if not root or path.startswith(root + "."):
            return tower
    return None


def load_module(module: Any, index: int) -> dict[str, torch.Tensor]:
    """The LoRA factors of one module: a state dict, or a file saved with ``torch.save`` (a state
    dict or a Lightning checkpoint, whose ``"state_dict"`` is used). Other entries (a trained
    head, base weights of a full checkpoint) are not part of a LoRA module: they are left out,
    with a warning naming them. ``ValueError`` for a module with no LoRA factor or with factors of
    a tuner LoRAHub cannot sum (DoRA, AdaLoRA)."""
    if isinstance(module, (str, os.PathLike)):
        if not os.path.isfile(module):
            raise ValueError(f"modules[{index}]={str(module)!r} is not a file; give a state dict or a saved one")
        state = torch.load(module, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    elif isinstance(module, Mapping):
        state = module
    else:
        raise TypeError(
            f"modules[{index}] is a {type(module).__name__}; give a LoRA state dict (a mapping of "
            "tensors) or the path of a saved one"
        )
    factors: dict[str, torch.Tensor] = {}
    other = []
    for key, value in state.items():
        if any(mark in key for mark in NOT_PLAIN_LORA):
            raise ValueError(
                f"modules[{index}] has {key!r}, the state of a peft tuner that is not plain LoRA (DoRA's "
                f"magnitudes, AdaLoRA's singular values): {LABEL} sums plain LoRA factors only"
            )
        if ".lora_A." in key or ".lora_B." in key:
            if not FACTOR_KEY.match(key) or not torch.is_tensor(value) or value.dim() != 2:
                raise ValueError(
                    f"modules[{index}] has {key!r}, which is not a LoRA factor "
                    "(<target>.lora_A|lora_B.<adapter>.weight, a matrix)"
                )
            factors[key] = value
        else:
            other.append(key)
    if not factors:
        raise ValueError(
            f"modules[{index}] holds no LoRA factor (keys <target>.lora_A.<adapter>.weight and "
            f"...lora_B...); its keys: {list(state)[:5]}"
        )
    if other:
        warnings.warn(
            f"{LABEL}: modules[{index}] also holds {len(other)} entries that are no LoRA factor "
            f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); only the LoRA factors are composed",
            UserWarning,
            stacklevel=3,
        )
    return factors


def _prefix_map(keys: list[str], targets: dict[str, _Target], index: int) -> Callable[[str], str]:
    """How this module's target paths map onto the model's: the same paths, or with one prefix
    added (the module was saved from the bare model, LoRAHub applied to a module holding it) or
    removed (a Lightning checkpoint's ``model.`` keys). The shortest prefix that maps *every* key
    onto a target wins."""
    paths = sorted({FACTOR_KEY.match(k).group("path") for k in keys})  # type: ignore[union-attr]
    first = paths[0]
    options: list[tuple[int, str, str]] = []  # (length, added, removed)
    for target in targets:
        if target == first:
            options.append((0, "", ""))
        elif target.endswith("." + first):
            options.append((len(target) - len(first), target[: len(target) - len(first)], ""))
        elif first.endswith("." + target):
            options.append((len(first) - len(target), "", first[: len(first) - len(target)]))
    for _, added, removed in sorted(set(options)):
        if all(p.startswith(removed) and added + p[len(removed) :] in targets for p in paths):
            return lambda p, a=added, r=removed: a + p[len(r) :]
    fits = lambda p: any(t == p or t.endswith("." + p) or p.endswith("." + t) for t in targets)  # noqa: E731
    bad = next((p for p in paths if not fits(p)), first)
    raise ValueError(
        f"modules[{index}]'s LoRA factors of {bad!r} adapt no LoRA target of this model (its targets: "
        f"{', '.join(list(targets)[:4])}, ...): {LABEL} composes modules trained on the same base model "
        "with LoRA's targets"
    )


@dataclass
class _Modules:
    """The modules' factors by target path: ``factors[path] = ([A_1..A_n], [B_1..B_n])``."""

    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]
    rank: int
    targets: dict[str, _Target]


def check_modules(model: nn.Module, modules: Sequence[Any]) -> _Modules:
    """Load the modules and check them against each other (same targets, same shapes: the same
    rank) and against ``model``'s LoRA targets (each factor pair fits its weight), naming the module
    and the key of the first mismatch."""
    targets = _model_targets(model)  # refuses an unsupported model before looking at the modules
    if isinstance(modules, (str, bytes, os.PathLike, Mapping)) or not isinstance(modules, Sequence):
        raise ValueError(
            f"modules must be a list of LoRA modules (state dicts or paths), got a {type(modules).__name__}"
        )
    if not modules:
        raise ValueError(f"modules=[] is not allowed; {LABEL} composes at least one LoRA module")
    loaded = [load_module(m, i) for i, m in enumerate(modules)]
    per_module: list[dict[tuple[str, str], torch.Tensor]] = []
    for index, factors in enumerate(loaded):
        where = _prefix_map(list(factors), targets, index)
        mapped: dict[tuple[str, str], torch.Tensor] = {}
        adapters = set()
        for key, value in factors.items():
            match = FACTOR_KEY.match(key)
            assert match is not None
            adapters.add(match.group("adapter"))
            mapped[(where(match.group("path")), match.group("which"))] = value
        if len(adapters) > 1:
            raise ValueError(
                f"modules[{index}] holds factors of {len(adapters)} adapters ({', '.join(sorted(adapters))}); "
                "give one adapter per module"
            )
        per_module.append(mapped)
    first = per_module[0]
    for index, mapped in enumerate(per_module[1:], start=1):
        missing = sorted(set(first) - set(mapped))
        extra = sorted(set(mapped) - set(first))
        if missing or extra:
            path, which = (missing or extra)[0]
            has, lacks = (0, index) if missing else (index, 0)
            raise ValueError(
                f"modules[{lacks}] has no lora_{which} factor for {path!r}, which modules[{has}] has: {LABEL} "
                "sums the factors key by key, so every module needs the same targets"
            )
        for key, value in mapped.items():
            if value.shape != first[key].shape:
                raise ValueError(
                    f"modules[{index}]'s lora_{key[1]} of {key[0]!r} has shape {tuple(value.shape)}, modules[0]'s "
                    f"{tuple(first[key].shape)}: {LABEL} sums the factors element-wise, so every module needs "
                    "the same targets and rank"
                )
    ranks = set()
    factors: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for path in sorted({p for p, _ in first}):
        if (path, "A") not in first or (path, "B") not in first:
            which = "B" if (path, "A") in first else "A"
            raise ValueError(f"modules[0] has no lora_{which} factor for {path!r}; a LoRA target needs A and B")
        a, b = first[(path, "A")], first[(path, "B")]
        out, inp = targets[path].shape
        if a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"modules[0]'s factors of {path!r} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) do not "
                f"fit its weight of shape {(out, inp)}: the module was trained on another base model"
            )
        ranks.add(a.shape[0])
        factors[path] = ([m[(path, "A")] for m in per_module], [m[(path, "B")] for m in per_module])
    if len(ranks) > 1:
        raise ValueError(f"modules[0] has factors of ranks {sorted(ranks)}; {LABEL} applies one rank r to every target")
    return _Modules(factors, ranks.pop(), {p: targets[p] for p in factors})


def compose(
    factors: tuple[list[torch.Tensor], list[torch.Tensor]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ wᵢ Aᵢ, Σ wᵢ Bᵢ)`` of one target (element-wise sums of the modules' factors)."""
    a_list, b_list = factors
    a = sum((float(w) * x for w, x in zip(weights, a_list)), torch.zeros_like(a_list[0]))
    b = sum((float(w) * x for w, x in zip(weights, b_list)), torch.zeros_like(b_list[0]))
    return a, b


def _layers(model: nn.Module) -> dict[str, Any]:
    """The peft LoRA layer of each target path, by path (the layer sits where the target was)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(layer)]: layer for _, _, layer in pt.tuner_layers(model)}


def _write(model: nn.Module, modules: _Modules, weights: Sequence[float]) -> None:
    """Put the composite factors of ``weights`` into the peft layers (no autograd)."""
    layers = _layers(model)
    with torch.no_grad():
        for path, pair in modules.factors.items():
            layer = layers[path]
            a, b = compose(pair, weights)
            layer.lora_A[pt.ADAPTER].weight.copy_(a)
            layer.lora_B[pt.ADAPTER].weight.copy_(b)


# --- the objective -------------------------------------------------------------------------------
def _logits(output: Any) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    logits = getattr(output, "logits", None)
    if torch.is_tensor(logits):
        return logits
    raise TypeError(
        f"the model returned a {type(output).__name__}, not logits: give examples=loss_fn "
        "(a callable model -> loss) for a model whose output is not class logits"
    )


def few_shot_loss(model: nn.Module, examples: Examples, reference: bool = False) -> float:
    """The loss of ``model`` on ``examples`` under ``no_grad``: ``loss_fn(model)``, or the
    cross-entropy of ``model(inputs)`` against ``targets`` averaged over every example of the
    ``(inputs, targets)`` batches (``reference``: the official scale, the sum of the batches' mean
    losses divided by the number of examples)."""
    with torch.no_grad():
        if callable(examples):
            value = examples(model)
            return float(value.detach()) if torch.is_tensor(value) else float(value)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        total, means, count = 0.0, 0.0, 0
        for index, batch in enumerate(examples):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    f"examples[{index}] is a {type(batch).__name__}; each batch must be (inputs, targets), "
                    "or give examples=loss_fn"
                )
            inputs, labels = (x.to(device) if torch.is_tensor(x) else x for x in batch)
            logits = _logits(model(inputs)).float()
            losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
            total += float(losses.sum())
            means += float(losses.mean())
            count += losses.numel()
        if count == 0:
            raise ValueError("examples holds no example; give at least one (inputs, targets) batch")
        return (means if reference else total) / count


def objective(loss: float, weights: Sequence[float], l1: float) -> float:
    """LoRAHub's score: ``loss + l1 · mean |wᵢ|`` (lower is better)."""
    return loss + l1 * sum(abs(float(w)) for w in weights) / len(weights)


def _check_examples(examples: Any, config: LoRAHubConfig) -> Examples | None:
    if config.weights is not None:
        if examples is not None:
            raise ValueError(
                f"weights={config.weights} and examples were both given; give weights to compose "
                "with them, or examples to search for them"
            )
        return None
    if examples is None:
        raise ValueError(
            f"examples is required to search for the weights ({LABEL} minimises the loss on them): "
            "give a list of (inputs, targets) batches or a loss_fn(model), or weights=[...] to compose without a search"
        )
    if callable(examples):
        return examples
    if isinstance(examples, (str, bytes, Mapping)) or not isinstance(examples, Iterable):
        raise ValueError(
            f"examples is a {type(examples).__name__}; give a list of (inputs, targets) batches or a loss_fn(model)"
        )
    batches = list(examples)  # a DataLoader is read once: every evaluation sees the same batches
    if not batches:
        raise ValueError("examples=[] holds no batch; give at least one (inputs, targets) batch")
    return batches


class _EvalMode:
    """Every module in eval mode for the search (dropout off, as the official code's
    ``model.eval()``), each module's own mode put back afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for module, mode in self.modes:
            module.training = mode


def _search(
    model: nn.Module, modules: _Modules, examples: Examples, config: LoRAHubConfig, n: int, progress: bool
) -> LoRAHubResult:
    """nevergrad's NGOpt over the weights; each evaluation composes, then measures the loss."""
    import nevergrad as ng
    import numpy as np

    parametrization = ng.p.Array(init=np.zeros(n), lower=-config.bound, upper=config.bound)
    if config.seed is not None:
        parametrization.random_state = np.random.RandomState(config.seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=config.budget)
    history: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.budget, desc=f"{LABEL} search", unit="eval", leave=False)

    def score(weights: np.ndarray) -> float:
        w = tuple(float(x) for x in weights)
        _write(model, modules, w)
        loss = few_shot_loss(model, examples, config.reference_loss)
        value = objective(loss, w, config.l1)
        history.append({"weights": w, "loss": loss, "objective": value})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", best=f"{min(h['objective'] for h in history):.4f}")
        return value

    try:
        recommendation = optimizer.minimize(score, verbosity=0)
    finally:
        if bar is not None:
            bar.close()
    weights = tuple(float(x) for x in recommendation.value)
    _write(model, modules, weights)
    seen = next((h for h in reversed(history) if h["weights"] == weights), None)
    loss = seen["loss"] if seen is not None else few_shot_loss(model, examples, config.reference_loss)
    return LoRAHubResult(weights, loss, objective(loss, weights, config.l1), history)


# --- apply / remove ------------------------------------------------------------------------------
def apply_lorahub(
    model: nn.Module,
    config: LoRAHubConfig | None = None,
    *,
    modules: Sequence[Any] | None = None,
    examples: Examples | None = None,
    progress: bool = False,
    **settings: Any,
) -> LoRAHubResult:
    """Compose ``modules`` (LoRA state dicts or their files, trained on ``model``'s base with the
    same targets and rank) into ``model`` in place: search the weights on ``examples`` (or take
    ``weights=``), then set ``peft`` LoRA layers of rank ``r`` on the modules' targets to
    ``(Σ wᵢ Aᵢ, Σ wᵢ Bᵢ)`` with scale ``alpha / r``. Returns the weights and the search's record
    (``progress=True``: a tqdm bar over the evaluations). Applying again replaces the composition.
    :func:`remove_lorahub` gives the library's model back exactly.

    Raises:
        TypeError: ``model`` has no tower with LoRA targets (BLIP, ...), naming it and the supported ones.
        ValueError: no modules, modules that differ in targets or rank or do not fit ``model``
            (naming the module and the key), ``examples`` missing for a search (or given with
            ``weights``), ``weights`` of another length than ``modules``, or a method that wraps the
            projections too (LoRA, DoRA, ...) already applied.
    """
    from peft import LoraConfig

    cfg = LoRAHubConfig.build(config, **settings)
    check_bool("progress", progress)
    if lorahub_applied(model):
        remove_lorahub(model)
    if modules is None:
        raise ValueError(f"modules is required: the LoRA modules (state dicts or paths) {LABEL} composes")
    _model_targets(model)  # an unsupported model is refused first (naming the tower) ...
    refuse_applied_conflicts(model, NAME)  # ... then another peft tuner or adapter on the projections
    hub = check_modules(model, modules)
    n = len(modules)
    if cfg.weights is not None and len(cfg.weights) != n:
        raise ValueError(f"weights={cfg.weights} has {len(cfg.weights)} entries for {n} modules; give one per module")
    found = _check_examples(examples, cfg)
    towers = [t for t in (_tower_of(model, p) for p in hub.factors) if t is not None]
    towers = list({id(t.root): t for t in towers}.values())
    wrapped_parameters = [f"{p}.{t.parameter}" for p, t in hub.targets.items() if t.parameter is not None]
    for tower in towers:  # LoRA's rule: vleff's generic block reads a bare parameter without peft's substitution
        from vleff.backbones import get_patch

        if wrapped_parameters and get_patch(tower.root) is not None:
            hooks = ", ".join(h.name for h in get_patch(tower.root).hooks)
            raise ValueError(
                f"cannot apply {NAME} while {hooks} is applied to {tower.describe()} (a vleff tower hook): "
                "vleff's generic block reads in_proj_weight without peft's substitution and would ignore "
                "the composite; remove it first"
            )
    peft_config = LoraConfig(
        r=hub.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=[p for p, t in hub.targets.items() if t.parameter is None],
        target_parameters=wrapped_parameters or None,
    )
    orders = {p: list(model.get_submodule(p)._parameters) for p, t in hub.targets.items() if t.parameter is not None}
    pt.inject_tuner(model, NAME, peft_config, towers, cfg.train_head, cfg.as_dict())
    pt.record_of(model, NAME)["orders"] = orders  # type: ignore[index]
    if cfg.weights is not None:
        _write(model, hub, cfg.weights)
        result = LoRAHubResult(cfg.weights)
    else:
        assert found is not None
        with _EvalMode(model):
            result = _search(model, hub, found, cfg, n, progress)
    object.__setattr__(model, RESULT_ATTR, result)
    return result


def remove_lorahub(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lorahub` exactly: the wrapped modules, names, ``requires_grad`` flags and
    ``state_dict`` keys are the library's again (open_clip's wrapped parameters in their order)."""
    record = pt.record_of(model, NAME)
    orders = dict(record.get("orders", {})) if record is not None else {}
    holder = pt.holder(model, NAME)
    pt.remove_tuner(model, NAME, LABEL)
    assert holder is not None
    for path, order in orders.items():
        params = holder.get_submodule(path)._parameters
        ordered = {k: params[k] for k in order if k in params} | {k: v for k, v in params.items() if k not in order}
        params.clear()
        params.update(ordered)
    holder.__dict__.pop(RESULT_ATTR, None)
    return model


def lorahub_applied(model: nn.Module) -> bool:
    return pt.tuner_in(model, NAME)


def lorahub_holds(module: nn.Module) -> bool:
    """Whether ``module`` holds a tower with LoRA targets (which model of a LightningModule the
    callback composes into: the modules' targets, not a ``towers`` setting, say where)."""
    try:
        return bool(_model_targets(module))
    except TypeError:
        return False


def lorahub_result(model: nn.Module) -> LoRAHubResult | None:
    """The result of the composition applied to ``model`` (``None`` when none is)."""
    holder = pt.holder(model, NAME)
    return None if holder is None else holder.__dict__.get(RESULT_ATTR)


def lorahub_settings(model: nn.Module) -> dict[str, Any]:
    """The settings as applied (the config given; the weights found are in :func:`lorahub_result`)."""
    settings = pt.applied_settings(model, NAME)
    settings.pop("towers", None)
    return settings


def lorahub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The composite factors (and trainable heads): an adapter-only state."""
    return pt.adapter_state_dict(model, NAME)


__all__ = [
    "LoRAHubConfig",
    "LoRAHubResult",
    "apply_lorahub",
    "check_modules",
    "compose",
    "few_shot_loss",
    "load_module",
    "lorahub_applied",
    "lorahub_holds",
    "lorahub_result",
    "lorahub_settings",
    "lorahub_state_dict",
    "objective",
    "remove_lorahub",
]
