"""LoHa (Hyeon-Woo et al., ICLR 2022, "FedPara"; as in LyCORIS) through Hugging Face ``peft``: a
Hadamard product of two rank-``r`` products, ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)`` with
``s = alpha / r``: rank up to ``r²`` for the parameters of two rank-``r`` LoRAs. ``peft`` starts
``W2b`` at zero: the model starts exactly at the frozen model.

Targets: the attention input projections (the ``"attention_in"`` role of
:data:`vleff.backbones.targets.PEFT_TARGETS`), as LoRA. **open_clip is refused**: its q/k/v are
``nn.MultiheadAttention``'s bare ``in_proj_weight``, which ``peft`` wraps only with LoRA's
``ParamWrapper``; the error names the tower and what is supported.

Trainable parameters per target ``W: out × in``: ``2·r·(in + out)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "loha"
LABEL = "LoHa"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft "
    "wraps only with its LoRA ParamWrapper, not LoHa's layers; use LoRA there"
)


@dataclass
class LoHaConfig(MethodConfig):
    """LoHa's settings.

    Attributes:
        r: rank of each of the two products.
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


def _peft_config(cfg: LoHaConfig, targets: dict[str, list[str]]) -> Any:
    from peft import LoHaConfig as PeftLoHaConfig

    return PeftLoHaConfig(r=cfg.r, alpha=cfg.alpha, **targets)


TUNER = pt.PeftTuner(NAME, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP, _peft_config, refuse_conflicts=refuse_applied_conflicts)


def loha_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the modules LoHa wraps in ``towers``."""
    return TUNER.targets(model, towers)


def apply_loha(model: nn.Module, config: LoHaConfig | None = None, **settings: Any) -> nn.Module:
    """``peft`` LoHa on the attention input projections of the towers ``towers`` names, in place;
    only the adapters (and a timm head with ``train_head``) train. Exact at the start.

    Raises:
        TypeError: a tower LoHa cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: another method that wraps the projections is applied.
    """
    return TUNER.apply(model, LoHaConfig.build(config, **settings))


remove_loha = TUNER.remove
loha_applied = TUNER.applied
loha_parameters = TUNER.parameters
loha_state_dict = TUNER.state_dict
loha_settings = TUNER.settings
