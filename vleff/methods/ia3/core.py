"""IA³ (Liu et al., NeurIPS 2022, "(IA)³") through Hugging Face ``peft``: learned vectors that
rescale activations, ``y = l ⊙ (W x)`` on the attention input projections and ``y = W (l ⊙ x)`` on
the MLP's output layer (a "feed-forward" target in ``peft``'s terms: its *input*, the MLP's hidden
activation, is scaled). The vectors start at one: the model starts exactly at the frozen model.

Targets (the roles of :data:`vleff.backbones.targets.PEFT_TARGETS`): ``"attention_in"`` (timm's
fused ``attn.qkv``, Hugging Face CLIP's ``q_proj``/``k_proj``/``v_proj``; the paper scales keys and
values, a fused ``qkv`` cannot be split, so vleff scales q, k and v alike) and ``"mlp_out"`` (timm
and Hugging Face CLIP ``mlp.fc2``). **open_clip is refused**: its q/k/v live in
``nn.MultiheadAttention``'s bare ``in_proj_weight``, which ``peft``'s IA³ cannot wrap (only its
LoRA has a parameter wrapper); the error names the tower and what is supported.

Trainable parameters per block: ``out`` of every attention input projection ``+ in`` of the MLP's
output layer (its hidden width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "ia3"
LABEL = "IA3"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft's "
    "IA3 cannot wrap; use LoRA there"
)


@dataclass
class IA3Config(MethodConfig):
    """IA³'s settings.

    Attributes:
        mlp: also scale the MLP's hidden activation (the input of its output layer, peft's
            feed-forward target); ``False``: the attention input projections only.
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    mlp: bool = True
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.mlp = check_bool("mlp", self.mlp)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def ia3_targets(model: nn.Module, towers: str = "all", mlp: bool = True) -> dict[str, list[str]]:
    """``{"target_modules": [...], "feedforward_modules": [...]}``: full names (relative to
    ``model``); ``TypeError`` naming the tower and what is supported for one IA³ cannot wrap."""
    chosen = pt.chosen_towers(model, towers)
    refuse = lambda t: pt.refuse_bare_parameters(t, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP)
    attention, _ = pt.tuner_targets(chosen, ("attention_in",), model, refuse)
    feedforward = pt.tuner_targets(chosen, ("mlp_out",), model, refuse)[0] if mlp else []
    return {"target_modules": attention + feedforward, "feedforward_modules": feedforward}


def apply_ia3(model: nn.Module, config: IA3Config | None = None, **settings: Any) -> nn.Module:
    """``peft`` IA³ vectors on the attention input projections (and the MLP's output layer with
    ``mlp``) of the towers ``towers`` names, in place; only they (and a timm head with
    ``train_head``) train. Exact at the start. :func:`remove_ia3` undoes it exactly.

    Raises:
        TypeError: a tower IA³ cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: another method that wraps the projections (LoRA, DoRA, AdaLoRA) is applied.
    """
    from peft import IA3Config as PeftIA3Config

    cfg = IA3Config.build(config, **settings)
    if ia3_applied(model):
        remove_ia3(model)
    targets = ia3_targets(model, cfg.towers, cfg.mlp)
    refuse_applied_conflicts(model, NAME)
    peft_config = PeftIA3Config(**targets)
    return pt.inject_tuner(model, NAME, peft_config, pt.chosen_towers(model, cfg.towers), cfg.train_head, cfg.as_dict())


def remove_ia3(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_ia3` exactly (modules, names, flags, ``state_dict`` keys)."""
    return pt.remove_tuner(model, NAME, LABEL)


def ia3_applied(model: nn.Module) -> bool:
    return pt.tuner_in(model, NAME)


def ia3_parameters(model: nn.Module) -> list[nn.Parameter]:
    return pt.adapter_parameters(model, NAME)


def ia3_state_dict(model: nn.Module) -> dict[str, Any]:
    return pt.adapter_state_dict(model, NAME)


def ia3_settings(model: nn.Module) -> dict[str, Any]:
    return pt.applied_settings(model, NAME)
