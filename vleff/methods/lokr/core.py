"""LoKr (Yeh et al., ICLR 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation"; LyCORIS) through Hugging Face ``peft``: the update as a Kronecker product,
``ΔW = s · W1 ⊗ (W2a W2b)`` with ``s = alpha / r``. Each of the target's two dimensions is split
into the factor pair nearest a square (``768 = 24 × 32``, ``2304 = 48 × 48``); ``W1`` is the small
full factor (``out_a × in_a``), the other factor ``out_b × in_b`` is a rank-``r`` product (kept
full when ``r`` is at least half its larger side). ``peft`` starts ``W1`` at zero: the model starts
exactly at the frozen model.

Targets: the attention input projections (the ``"attention_in"`` role of
:data:`vleff.backbones.targets.PEFT_TARGETS`), as LoRA. **open_clip is refused**: its q/k/v are
``nn.MultiheadAttention``'s bare ``in_proj_weight``, which ``peft`` wraps only with LoRA's
``ParamWrapper``; the error names the tower and what is supported.

Trainable parameters per target ``W: out × in`` (factor pairs ``out = out_a·out_b``,
``in = in_a·in_b``, ``a ≤ b``): ``out_a·in_a + r·(out_b + in_b)`` — 1,792 for ViT-B/16's qkv at
``r = 8``, 35 times fewer than LoRA's 24,576.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "lokr"
LABEL = "LoKr"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft "
    "wraps only with its LoRA ParamWrapper, not LoKr's layers; use LoRA there"
)


@dataclass
class LoKrConfig(MethodConfig):
    """LoKr's settings.

    Attributes:
        r: rank of the second Kronecker factor's product.
        alpha: scale ``alpha / r`` of the update.
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    r: int = 8
    alpha: float = 8.0
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.r = check_int("r", self.r, low=1)
        self.alpha = check_number("alpha", self.alpha, low=0.0, low_open=True)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def _peft_config(cfg: LoKrConfig, targets: dict[str, list[str]]) -> Any:
    from peft import LoKrConfig as PeftLoKrConfig

    return PeftLoKrConfig(r=cfg.r, alpha=cfg.alpha, **targets)


TUNER = pt.PeftTuner(NAME, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP, _peft_config, refuse_conflicts=refuse_applied_conflicts)


def lokr_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the modules LoKr wraps in ``towers``."""
    return TUNER.targets(model, towers)


def apply_lokr(model: nn.Module, config: LoKrConfig | None = None, **settings: Any) -> nn.Module:
    """``peft`` LoKr on the attention input projections of the towers ``towers`` names, in place;
    only the adapters (and a timm head with ``train_head``) train. Exact at the start.

    Raises:
        TypeError: a tower LoKr cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: another method that wraps the projections is applied.
    """
    return TUNER.apply(model, LoKrConfig.build(config, **settings))


remove_lokr = TUNER.remove
lokr_applied = TUNER.applied
lokr_parameters = TUNER.parameters
lokr_state_dict = TUNER.state_dict
lokr_settings = TUNER.settings
