"""LoRA through Hugging Face ``peft`` (the baseline side tuning is compared with; vleff does not
implement LoRA itself): ``peft.inject_adapter_in_model`` adds the adapters in place, so the
user's model keeps its class and attribute names (a LightningModule keeps working).

Targets per family (the attention input projections, the usual LoRA choice for ViTs):

* timm ViT: every block's fused ``attn.qkv`` ``nn.Linear`` (``target_modules``);
* Hugging Face CLIP (both towers): ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` ``nn.Linear``;
* open_clip (both towers): the blocks' ``nn.MultiheadAttention`` keeps q/k/v in one raw
  parameter, ``in_proj_weight``, with no ``nn.Linear`` to wrap. ``peft`` 0.21 reaches it through
  ``target_parameters=["attn.in_proj_weight"]`` (its ``ParamWrapper``: ``W + BA`` substituted for
  the parameter while the module's forward runs); tested here to equal the model exactly at init.

Where ``peft`` cannot wrap (said here so nobody relies on it):

* ``peft``'s own ``nn.MultiheadAttention`` LoRA layer (``target_modules=["attn"]``) is **not
  used**: on an open_clip block it changes the output of an untrained adapter (measured here:
  max |Δ| ≈ 3.6 on the tiny test CLIP with ``B = 0``), so vleff uses ``target_parameters``.
* open_clip's ``out_proj`` is not adapted: ``nn.MultiheadAttention`` never calls its forward.
* open_clip towers with LoRA and a vleff tower hook (ToMe, EViT, LST ...) do not combine: vleff's
  generic block reads ``in_proj_weight`` directly, without ``peft``'s substitution, so the
  adapter would be silently ignored; :func:`apply_lora` refuses a patched open_clip tower, and
  the open_clip adapter's generic block refuses a ``peft``-wrapped attention (hook applied after).

A registered method (``"lora"``, kind ``side``) like the others: :class:`LoRAConfig`,
:func:`apply_lora` / :func:`remove_lora` (every ``peft`` layer replaced by the very module it
wrapped, so keys, values and ``requires_grad`` flags are the library's again), the callback
:class:`vleff.callbacks.LoRA` and :class:`vleff.callbacks.LoRAMixin`. Targets are the full
module / parameter names of the chosen towers' blocks (``towers``), so a model's other
``qkv`` / ``in_proj_weight`` modules are left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.backbones import TowerAdapter, find_towers, get_patch
from vleff.backbones.input_grads import attach_input_grads, detach_input_grads
from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.peft_tuners import LAYER_TAG, data_parallel_mesh_hidden
from vleff.tokens.common import select_towers

ADAPTER = "default"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT, open_clip and Hugging Face CLIP towers"
#: where :func:`apply_lora` keeps what it changed on the model: ``(name -> requires_grad before
#: apply, whether peft added its ``peft_config`` attribute)``
FLAGS_ATTR = "_vleff_lora_requires_grad"
#: module path -> its parameter names in order before :func:`apply_lora` (targets of ``target_parameters``)
ORDER_ATTR = "_vleff_lora_parameter_order"
#: ``peft`` moves a wrapped module's state one level down: ``qkv.weight`` -> ``qkv.base_layer.weight``
BASE_LAYER = re.compile(r"(\.base_layer)+\.")


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA's settings.

    Attributes:
        r: adapter rank (``A: r x in``, ``B: out x r``).
        alpha: scale ``alpha / r`` of the adapter's output (peft's ``lora_alpha``).
        dropout: dropout on the adapter input in training.
        train_head: keep a timm classifier head trainable (everything else but the adapters is frozen).
        towers: ``"image"``, ``"text"`` or ``"all"`` (the attention projections of those towers).
    """

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.r = check_int("r", self.r, low=1)
        self.alpha = check_number("alpha", self.alpha, low=0.0, low_open=True)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def _selected_towers(model: nn.Module, towers: str) -> list[TowerAdapter]:
    """The towers ``towers`` names, every one checked to be supported before anything changes."""
    chosen = select_towers(model, towers)
    for tower in chosen:
        _tower_targets(tower, "")
    return chosen


def _tower_targets(tower: TowerAdapter, block: str) -> tuple[list[str], list[str]]:
    """``(module names, parameter names)`` peft wraps in one block named ``block``."""
    return tower.lora_targets(block)  # the per-family table lives with the adapters (vleff.backbones.targets)


def lora_targets(model: nn.Module, towers: str = "all") -> dict[str, list[str]]:
    """``{"target_modules": [...], "target_parameters": [...]}``: the full names (relative to
    ``model``) of what peft wraps in the towers ``towers`` names (``TypeError`` when a tower of
    ``model`` is not supported)."""
    names = {id(m): n for n, m in model.named_modules()}
    modules: list[str] = []
    params: list[str] = []
    for tower in _selected_towers(model, towers):
        for block in tower.blocks():
            mods, pars = _tower_targets(tower, names[id(block)])
            modules += [m.lstrip(".") for m in mods]
            params += [p.lstrip(".") for p in pars]
    return {"target_modules": modules, "target_parameters": params}


#: the hooks that let LoRA inside frozen blocks get gradients (:mod:`vleff.backbones.input_grads`)
INPUT_HOOKS_ATTR = "_vleff_lora_input_hooks"


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **settings: Any) -> nn.Module:
    """Inject ``peft`` LoRA adapters (rank ``r``, scale ``alpha / r``) into the attention input
    projections of the towers ``towers`` names, in place, and train only them (and a timm
    classifier head when ``train_head``; parameters of other vleff modules keep their flags).
    ``B`` starts at zero: the model starts at the frozen model. Applying again replaces the
    adapters (drawn anew). :func:`remove_lora` undoes it exactly.

    Raises:
        TypeError: a tower vleff finds is not supported (BLIP, ...), or none is found.
        ValueError: an open_clip tower carries a vleff tower hook (its generic block reads
            ``in_proj_weight`` without peft's substitution and would ignore the adapter).
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoRAConfig.build(config, **settings)
    if lora_applied(model):
        remove_lora(model)
    towers = _selected_towers(model, cfg.towers)
    refuse_applied_conflicts(model, "lora")  # another peft tuner (DoRA, IA3, AdaLoRA) on the projections
    for tower in towers:
        if tower.lora_targets("")[1] and get_patch(tower.root) is not None:  # wraps bare parameters
            raise ValueError(
                f"cannot apply lora while {', '.join(h.name for h in get_patch(tower.root).hooks)} is "
                f"applied to {tower.describe()} (a vleff tower hook): vleff's generic block reads "
                "in_proj_weight without peft's substitution and would ignore the adapter; remove it first"
            )
    targets = lora_targets(model, cfg.towers)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # peft's ParamWrapper re-registers a targeted parameter (open_clip's in_proj_weight) at every
    # forward, moving it to the end of its module's parameters; the order is put back on removal
    orders = {
        name.rpartition(".")[0]: list(model.get_submodule(name.rpartition(".")[0])._parameters)
        for name in targets["target_parameters"]
    }
    added_config = "peft_config" not in model.__dict__
    peft_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets["target_modules"],  # peft: [] (not None) for parameters only
        target_parameters=targets["target_parameters"] or None,
    )
    with data_parallel_mesh_hidden(model):
        inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    heads = {
        id(p)
        for t in towers
        if cfg.train_head and t.classifier_head() is not None
        for p in t.classifier_head().parameters()
    }
    for name, p in model.named_parameters():
        if "lora_" in name or id(p) in heads:
            p.requires_grad_(True)
        elif "vleff_" not in name:  # another vleff method's own modules are its business
            p.requires_grad_(False)
    object.__setattr__(
        model, FLAGS_ATTR, (flags, added_config)
    )  # a plain attribute: deep-copies and pickles with the model
    object.__setattr__(model, ORDER_ATTR, orders)
    object.__setattr__(model, INPUT_HOOKS_ATTR, attach_input_grads(towers))
    return model


def _lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, child name, peft layer)`` for every outermost peft layer in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found, seen = [], set()
    for parent in model.modules():
        if id(parent) in seen:
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, BaseTunerLayer):
                found.append((parent, child_name, child))
                seen.update(id(m) for m in child.modules())  # nested ParamWrappers: only the outermost
    return found


def remove_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lora`: every peft layer replaced in its parent by the module it wraps
    (the very module, so the state-dict keys and values are the library's again), the
    parameters of a module targeted by parameter (open_clip's ``in_proj_weight``) in their
    original order, and the ``requires_grad`` flags as they were before :func:`apply_lora`."""
    if not lora_applied(model):
        raise ValueError(f"LoRA is not applied to this {type(model).__name__}; nothing to remove")
    for parent, child_name, layer in _lora_layers(model):
        base = layer
        while hasattr(base, "base_layer"):
            base = base.base_layer
        setattr(parent, child_name, base)
    for path, order in model.__dict__.pop(ORDER_ATTR, {}).items():
        params = model.get_submodule(path)._parameters
        ordered = {k: params[k] for k in order if k in params} | {k: v for k, v in params.items() if k not in order}
        params.clear()
        params.update(ordered)
    detach_input_grads(model.__dict__.pop(INPUT_HOOKS_ATTR, []))
    flags, added_config = model.__dict__.pop(FLAGS_ATTR, ({}, False))
    if added_config:
        model.__dict__.pop("peft_config", None)
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    return model


def lora_applied(model: nn.Module) -> bool:
    """Whether plain LoRA is applied: ``lora_A`` adapters, and none of DoRA's magnitudes or
    AdaLoRA's singular values (those peft tuners name their factors ``lora_A`` too)."""
    names = [n for n, _ in model.named_parameters()]
    if any(LAYER_TAG in m.__dict__ for m in model.modules()):  # another method's peft layers (QLoRA's LoRA)
        return False
    return any("lora_A" in n for n in names) and not any("lora_magnitude_vector" in n or ".lora_E." in n for n in names)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_num_parameters(r: int, pairs: list[tuple[int, int]]) -> int:
    """Parameters of rank-``r`` adapters on weights of shapes ``(out, in)``: ``r·(in + out)`` each."""
    return sum(r * (i + o) for o, i in pairs)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' (and trainable heads') state."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if "lora_" in k or k in trainable}


def library_key(key: str) -> str:
    """The library's own state-dict key of a key of a LoRA-wrapped model (``base_layer`` dropped)."""
    return BASE_LAYER.sub(".", key)


__all__ = [
    "LoRAConfig",
    "apply_lora",
    "library_key",
    "lora_applied",
    "lora_num_parameters",
    "lora_parameters",
    "lora_state_dict",
    "lora_targets",
    "remove_lora",
]


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """LoRA's settings as applied to ``model``, read back from its ``peft`` layers."""
    layers = [layer for _, _, layer in _lora_layers(model)]
    if not layers:
        return {}
    layer: Any = layers[0]
    key = next(iter(layer.r))
    drop = layer.lora_dropout[key]
    carrying = frozenset(
        t.modality for t in find_towers(model) if any("lora_A" in n for n, _ in t.root.named_parameters())
    )
    return {
        "r": layer.r[key],
        "alpha": layer.lora_alpha[key],
        "dropout": float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
        "towers": carrying,
    }
