"""AdaLoRA (Zhang et al., ICLR 2023) through Hugging Face ``peft``: an SVD-form update
``ΔW = P·Λ·Q`` (scaled by ``alpha / r``) whose total rank budget falls from ``init_r`` per matrix to
``target_r`` on average during training, pruning the least important singular values (``Λ``
entries masked, the parameters stay allocated). ``Λ`` starts at zero: the model starts exactly at
the frozen model.

The budget lives in tuner-level state (``peft``'s ``AdaLoraModel`` and its ``RankAllocator``),
which ``inject_adapter_in_model`` does not build; vleff builds ``AdaLoraModel`` on the model *in
place* (the model keeps its class and names; the tuner object is kept beside it, not as a
submodule) and exposes :func:`update_and_allocate`, to be called after every optimizer step
(the callback :class:`vleff.callbacks.AdaLoRA` does it with the number of optimizer steps done,
so the last step of ``total_step`` fixes the final budget).

The orthogonal regulariser ``orth_reg_weight · mean(‖PPᵀ − I‖_F, ‖QᵀQ − I‖_F)`` is added by
``peft`` only to a model output with ``.loss``; a tower returns a tensor, so vleff computes it
after every training forward (grad enabled, module in train mode) and records it as the model's
pending aux loss (:func:`vleff.tokens.aux.set_module_aux_loss`): the callback adds it to the loss
(``train/aux/adalora_orth``), a mixin user adds ``self.vleff_aux_loss()``.

Targets: the attention input projections (``"attention_in"``, as LoRA); open_clip's bare
``in_proj_weight`` is refused (``peft``'s AdaLoRA has no parameter wrapper).
Trainable parameters per target ``W: out × in``: ``init_r·(in + out + 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "adalora"
LABEL = "AdaLoRA"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft "
    "wraps only with its LoRA ParamWrapper, not AdaLoRA's SVD layers; use LoRA there"
)
#: the aux-loss name of the orthogonal regulariser
ORTH_LOSS = "adalora_orth"
#: forward-hook handle id on the model carrying the tuner
HOOK_ATTR = "_vleff_adalora_orth_hook"


@dataclass
class AdaLoRAConfig(MethodConfig):
    """AdaLoRA's settings (defaults: the paper's ranks 12 → 8; ``peft``'s schedule defaults).

    Attributes:
        init_r: rank of every target at the start.
        target_r: average rank per target once the budget schedule ends (``≤ init_r``).
        alpha: scale ``alpha / r`` (peft's ``lora_alpha``).
        dropout: dropout on the adapter input.
        total_step: optimizer steps of the run (the schedule's length); ``None`` only in the
            callback, which then takes the trainer's ``max_steps``.
        tinit: steps before the budget starts falling.
        tfinal: steps at the end with the final budget fixed.
        delta_t: steps between two budget allocations (peft's ``deltaT``).
        beta1, beta2: smoothing of the sensitivity and of its uncertainty (in ``(0, 1)``).
        orth_reg_weight: weight of the orthogonal regulariser (``0``: none).
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    total_step: int | None = None
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.init_r = check_int("init_r", self.init_r, low=1)
        self.target_r = check_int("target_r", self.target_r, low=1)
        if self.target_r > self.init_r:
            raise ValueError(f"target_r={self.target_r} is not allowed: it must be at most init_r={self.init_r}")
        self.alpha = check_number("alpha", self.alpha, low=0.0, low_open=True)
        self.dropout = check_number("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.total_step is not None:
            self.total_step = check_int("total_step", self.total_step, low=1)
        self.tinit = check_int("tinit", self.tinit, low=0)
        self.tfinal = check_int("tfinal", self.tfinal, low=0)
        self.delta_t = check_int("delta_t", self.delta_t, low=1)
        self.beta1 = check_number("beta1", self.beta1, low=0.0, high=1.0, low_open=True, high_open=True)
        self.beta2 = check_number("beta2", self.beta2, low=0.0, high=1.0, low_open=True, high_open=True)
        self.orth_reg_weight = check_number("orth_reg_weight", self.orth_reg_weight, low=0.0)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit} is not allowed with total_step={self.total_step} and tfinal={self.tfinal}: "
                "the budget must have steps to fall in (tinit < total_step - tfinal)"
            )


def _peft_config(cfg: AdaLoRAConfig, targets: dict[str, list[str]]) -> Any:
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        total_step=cfg.total_step,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        **targets,
    )


def _tuner_class() -> type:
    from peft.tuners.adalora import AdaLoraModel

    return AdaLoraModel


# built through peft's tuner class, not inject_adapter_in_model: the rank allocator is model-level state
TUNER = pt.PeftTuner(
    NAME,
    LABEL,
    SUPPORTED,
    WHY_NOT_OPEN_CLIP,
    _peft_config,
    tuner_class=_tuner_class,
    refuse_conflicts=refuse_applied_conflicts,
)


def adalora_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the modules AdaLoRA wraps in ``towers``."""
    return TUNER.targets(model, towers)


def orthogonal_regulariser(model: nn.Module) -> torch.Tensor:
    """``mean`` over every ``P`` (``r × in``) and ``Q`` (``out × r``) of AdaLoRA on ``model`` of
    ``‖PPᵀ − I‖_F`` and ``‖QᵀQ − I‖_F`` (unweighted)."""
    from peft.tuners.adalora.layer import AdaLoraLayer

    terms = []
    for module in model.modules():
        if isinstance(module, AdaLoraLayer):
            for key in module.lora_A:
                p, q = module.lora_A[key], module.lora_B[key]
                eye = torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
                terms.append(torch.linalg.matrix_norm(p @ p.T - eye))
                terms.append(torch.linalg.matrix_norm(q.T @ q - eye))
    return torch.stack(terms).mean()


class OrthogonalLoss:
    """Forward hook on the adapted model: after a training forward (grad enabled, train mode),
    record ``weight · orthogonal_regulariser`` as its pending aux loss. A plain object."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.weight > 0 and module.training and torch.is_grad_enabled():
            from vleff.tokens.aux import set_module_aux_loss

            set_module_aux_loss(module, ORTH_LOSS, self.weight * orthogonal_regulariser(module))


def apply_adalora(model: nn.Module, config: AdaLoRAConfig | None = None, **settings: Any) -> nn.Module:
    """``peft`` AdaLoRA on the attention input projections of the towers ``towers`` names, in
    place, with its rank allocator; only the adapters (and a timm head with ``train_head``) train.
    Exact at the start. Call :func:`update_and_allocate` after every optimizer step.

    Raises:
        TypeError: a tower AdaLoRA cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: ``total_step`` is not given; another projection-wrapping method is applied.
    """
    cfg = AdaLoRAConfig.build(config, **settings)
    if cfg.total_step is None:
        raise ValueError(
            "total_step=None is not allowed here: AdaLoRA's rank budget schedule needs the number of "
            "optimizer steps of the run; give total_step=<int >= 1> (the AdaLoRA callback takes the "
            "trainer's max_steps when it is not given)"
        )
    if adalora_applied(model):
        remove_adalora(model)  # the regulariser's hook too
    TUNER.apply(model, cfg)
    object.__setattr__(model, HOOK_ATTR, model.register_forward_hook(OrthogonalLoss(cfg.orth_reg_weight)).id)
    return model


def remove_adalora(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_adalora` exactly (modules, names, flags, ``state_dict`` keys; the
    tuner object and the regulariser's hook dropped)."""
    target = pt.holder(model, NAME)
    if target is not None:
        hook = target.__dict__.pop(HOOK_ATTR, None)
        target._forward_hooks.pop(hook, None)
        from vleff.tokens.aux import MODULE_AUX_ATTR

        target.__dict__.pop(MODULE_AUX_ATTR, None)
    return pt.remove_tuner(model, NAME, LABEL)


adalora_applied = TUNER.applied
adalora_parameters = TUNER.parameters
adalora_state_dict = TUNER.state_dict
adalora_settings = TUNER.settings


def allocator(model: nn.Module) -> Any:
    """``peft``'s ``RankAllocator`` of the AdaLoRA applied to ``model``."""
    tuner = pt.tuner_of(model, NAME)
    if tuner is None:
        raise ValueError(f"{LABEL} is not applied to this {type(model).__name__}")
    return tuner.rankallocator


def set_total_step(model: nn.Module, total_step: int) -> None:
    """Set the schedule's length on an applied AdaLoRA (the callback's ``max_steps``)."""
    total_step = check_int("total_step", total_step, low=1)
    tuner = pt.tuner_of(model, NAME)
    config = tuner.peft_config[pt.ADAPTER]
    if config.tinit >= total_step - config.tfinal:
        raise ValueError(
            f"total_step={total_step} is not allowed with tinit={config.tinit} and tfinal={config.tfinal}: "
            "the budget must have steps to fall in (tinit < total_step - tfinal)"
        )
    tuner.rankallocator.set_total_step(total_step)
    pt.record_of(model, NAME)["settings"]["total_step"] = total_step


def update_and_allocate(model: nn.Module, step: int) -> None:
    """``peft``'s budget step after optimizer step number ``step`` (the number of optimizer steps
    done, from 1): updates the importance scores from the current gradients and masks ``Λ`` down to
    the schedule's budget; at ``step = total_step - tfinal`` the final rank pattern is fixed."""
    tuner = pt.tuner_of(model, NAME)
    if tuner is None:
        raise ValueError(f"{LABEL} is not applied to this {type(model).__name__}")
    tuner.update_and_allocate(step)


def rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    """``peft``'s allocated rank pattern (per ``lora_E``: which singular values are kept), or
    ``None`` before the first allocation."""
    tuner = pt.tuner_of(model, NAME)
    return None if tuner is None else tuner.peft_config[pt.ADAPTER].rank_pattern


def ranks(model: nn.Module) -> dict[str, int]:
    """The rank each target has now: the singular values its budget keeps (``peft``'s rank pattern),
    or all ``init_r`` of them before the first allocation. Not the non-zero ``Λ`` entries: ``Λ``
    starts at zero, so those would read 0 before training although nothing is masked yet."""
    counts = {
        name.rsplit(".lora_E", 1)[0]: int(p.shape[0])
        for name, p in pt.holder(model, NAME).named_parameters()
        if ".lora_E." in name
    }
    for key, kept in (rank_pattern(model) or {}).items():
        target = key.rsplit(".lora_E", 1)[0]
        if target not in counts:
            raise KeyError(f"{LABEL}: the rank pattern names {key!r}, which is not one of the adapted layers")
        counts[target] = int(sum(kept))
    return counts


def allocator_state(model: nn.Module) -> dict[str, Any]:
    """What a resume needs of the allocator: the smoothed scores and the rank pattern."""
    alloc = allocator(model)
    return {
        "ipt": {k: v.detach().clone() for k, v in alloc.ipt.items()},
        "exp_avg_ipt": {k: v.detach().clone() for k, v in alloc.exp_avg_ipt.items()},
        "exp_avg_unc": {k: v.detach().clone() for k, v in alloc.exp_avg_unc.items()},
        "rank_pattern": rank_pattern(model),
        "total_step": alloc.peft_config.total_step,
    }


def load_allocator_state(model: nn.Module, state: dict[str, Any]) -> None:
    alloc = allocator(model)
    device = next(iter(adalora_parameters(model))).device
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(alloc, key, {k: v.to(device) for k, v in state[key].items()})
    alloc.peft_config.rank_pattern = state["rank_pattern"]
    if state.get("total_step") is not None:
        set_total_step(model, state["total_step"])
