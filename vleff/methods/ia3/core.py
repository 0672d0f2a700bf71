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


def _peft_config(cfg: IA3Config, targets: dict[str, list[str]]) -> Any:
    from peft import IA3Config as PeftIA3Config

    # peft wants feedforward_modules even when empty (mlp=False)
    return PeftIA3Config(
        target_modules=targets["target_modules"], feedforward_modules=targets.get("feedforward_modules", [])
    )


TUNER = pt.PeftTuner(
    NAME,
    LABEL,
    SUPPORTED,
    WHY_NOT_OPEN_CLIP,
    _peft_config,
    ("attention_in", "mlp_out"),
    ("mlp_out",),
    refuse_conflicts=refuse_applied_conflicts,
)


def _roles(mlp: bool) -> tuple[str, ...]:
    return ("attention_in", "mlp_out") if mlp else ("attention_in",)


def ia3_targets(model: nn.Module, towers: str = "all", mlp: bool = True) -> dict[str, list[str]]:
    """``{"target_modules": [...], "feedforward_modules": [...]}``: full names (relative to
    ``model``); ``TypeError`` naming the tower and what is supported for one IA³ cannot wrap."""
    targets = TUNER.peft_targets(model, IA3Config(mlp=mlp, towers=towers), _roles(mlp))
    return {"target_modules": targets["target_modules"], "feedforward_modules": targets.get("feedforward_modules", [])}


def apply_ia3(model: nn.Module, config: IA3Config | None = None, **settings: Any) -> nn.Module:
    """``peft`` IA³ vectors on the attention input projections (and the MLP's output layer with
    ``mlp``) of the towers ``towers`` names, in place; only they (and a timm head with
    ``train_head``) train. Exact at the start. :func:`remove_ia3` undoes it exactly.

    Raises:
        TypeError: a tower IA³ cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: another method that wraps the projections (LoRA, DoRA, AdaLoRA) is applied.
    """
    cfg = IA3Config.build(config, **settings)
    return TUNER.apply(model, cfg, _roles(cfg.mlp))


remove_ia3 = TUNER.remove
ia3_applied = TUNER.applied
ia3_parameters = TUNER.parameters
ia3_state_dict = TUNER.state_dict
ia3_settings = TUNER.settings
