"""DoRA (Liu et al., ICML 2024) through Hugging Face ``peft``: LoRA with the weight split into a
trained per-output-row magnitude and a direction, ``W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖`` (the norm
per output row, detached in backward; ``peft``'s ``LoraConfig(use_dora=True)``). ``m`` starts at
``‖W₀‖`` and ``B`` at zero: the model starts exactly at the frozen model.

Targets: the attention input projections (the ``"attention_in"`` role of
:data:`vleff.backbones.targets.PEFT_TARGETS`: timm's fused ``attn.qkv``, Hugging Face CLIP's
``q_proj``/``k_proj``/``v_proj``), as vleff's LoRA. **open_clip is refused**: its
``nn.MultiheadAttention`` keeps q/k/v in the bare parameter ``in_proj_weight``, which ``peft``
reaches only through its LoRA ``ParamWrapper``, and that wrapper does not do DoRA ("lora.ParamWrapper
does not work with use_dora=True", measured with peft 0.21.2). vleff does not silently move DoRA to
open_clip's MLP instead (a different method placement); the error names the tower and what is
supported. Hugging Face BLIP has no row in the table: refused too.

Trainable parameters per target ``W: out × in``: ``r·(in + out)`` (A, B) ``+ out`` (magnitudes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "dora"
LABEL = "DoRA"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft "
    "wraps only with its LoRA ParamWrapper, and that wrapper does not do DoRA; use LoRA there"
)


@dataclass
class DoRAConfig(MethodConfig):
    """DoRA's settings.

    Attributes:
        r: rank of the direction update (``A: r x in``, ``B: out x r``).
        alpha: scale ``alpha / r`` of ``BA`` (peft's ``lora_alpha``).
        dropout: dropout on the adapter input in training.
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
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


def _peft_config(cfg: DoRAConfig, targets: dict[str, list[str]]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=True, **targets)


TUNER = pt.PeftTuner(NAME, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP, _peft_config, refuse_conflicts=refuse_applied_conflicts)


def dora_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the ``nn.Linear`` modules DoRA wraps; ``TypeError``
    naming the tower and what is supported for a tower it cannot wrap."""
    return TUNER.targets(model, towers)


def apply_dora(model: nn.Module, config: DoRAConfig | None = None, **settings: Any) -> nn.Module:
    """``peft`` DoRA adapters on the attention input projections of the towers ``towers`` names,
    in place; only they (and a timm head with ``train_head``) train. Exact at the start.
    Applying again replaces the adapters. :func:`remove_dora` undoes it exactly.

    Raises:
        TypeError: a tower DoRA cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: another method that wraps the projections (LoRA, IA³, AdaLoRA) is applied.
    """
    return TUNER.apply(model, DoRAConfig.build(config, **settings))


remove_dora = TUNER.remove
dora_applied = TUNER.applied
dora_parameters = TUNER.parameters
dora_state_dict = TUNER.state_dict
dora_settings = TUNER.settings
