"""OFT (Qiu et al., NeurIPS 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning")
through Hugging Face ``peft``: the frozen weight turned by a learned orthogonal matrix,
``W' = W₀ R`` with ``R`` block-diagonal (blocks of ``block_size`` over the input dimension), each
block the Cayley transform ``(I + S)(I − S)⁻¹`` of a skew-symmetric ``S`` (``block_size·(block_size
− 1)/2`` free parameters). ``S`` starts at zero, so ``R = I``: the model starts exactly at the
frozen model. Orthogonality keeps the angles between neurons (the hyperspherical energy) of the
pretrained layer.

``peft``'s default computes the Cayley inverse by a 5-term Neumann series (faster, ``R`` only
approximately orthogonal once ``S`` grows); vleff's default is the exact transform the paper
defines (``cayley_neumann=False``), and ``cayley_neumann=True`` takes ``peft``'s.

Targets: the attention input projections (the ``"attention_in"`` role of
:data:`vleff.backbones.targets.PEFT_TARGETS`). **open_clip is refused** (q/k/v are
``nn.MultiheadAttention``'s bare ``in_proj_weight``, which ``peft`` wraps only for LoRA).

Trainable parameters per target ``W: out × in``: ``(in / block_size) · block_size·(block_size − 1)/2``
(11,904 for ViT-B/16's qkv at block size 32); ``in`` must be a multiple of ``block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import peft_tuners as pt

NAME = "oft"
LABEL = "OFT"
TOWERS = ("image", "text")
SUPPORTED = "timm ViT and Hugging Face CLIP towers (image and text)"
WHY_NOT_OPEN_CLIP = (
    "open_clip's attention keeps q/k/v in nn.MultiheadAttention's bare in_proj_weight, which peft "
    "wraps only with its LoRA ParamWrapper, not OFT's layers; use LoRA there"
)


@dataclass
class OFTConfig(MethodConfig):
    """OFT's settings.

    Attributes:
        block_size: side of each orthogonal block (``peft``'s ``oft_block_size``, default 32); the
            targets' input width must be a multiple of it.
        coft: constrained OFT (keep ``R`` within ``eps`` of the identity).
        eps: COFT's radius.
        cayley_neumann: ``peft``'s Neumann-series approximation of the Cayley inverse instead of
            the exact transform.
        train_head: keep a timm classifier head trainable.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    cayley_neumann: bool = False
    train_head: bool = True
    towers: str = "all"

    def __post_init__(self) -> None:
        self.block_size = check_int("block_size", self.block_size, low=2)
        self.coft = check_bool("coft", self.coft)
        self.eps = check_number("eps", self.eps, low=0.0, low_open=True)
        self.cayley_neumann = check_bool("cayley_neumann", self.cayley_neumann)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def _peft_config(cfg: OFTConfig, targets: dict[str, list[str]]) -> Any:
    from peft import OFTConfig as PeftOFTConfig

    return PeftOFTConfig(
        r=0,
        oft_block_size=cfg.block_size,
        coft=cfg.coft,
        eps=cfg.eps,
        use_cayley_neumann=cfg.cayley_neumann,
        **targets,
    )


TUNER = pt.PeftTuner(NAME, LABEL, SUPPORTED, WHY_NOT_OPEN_CLIP, _peft_config, refuse_conflicts=refuse_applied_conflicts)


def oft_targets(model: nn.Module, towers: str = "all") -> list[str]:
    """Full names (relative to ``model``) of the modules OFT wraps in ``towers``."""
    return TUNER.targets(model, towers)


def apply_oft(model: nn.Module, config: OFTConfig | None = None, **settings: Any) -> nn.Module:
    """``peft`` OFT on the attention input projections of the towers ``towers`` names, in place;
    only the rotations (and a timm head with ``train_head``) train. Exact at the start.

    Raises:
        TypeError: a tower OFT cannot wrap (open_clip, BLIP, ...), naming it and the supported ones.
        ValueError: ``block_size`` does not divide a target's input width (naming both); another
            method that wraps the projections is applied.
    """
    cfg = OFTConfig.build(config, **settings)
    widths = {m.in_features for name, m in model.named_modules() if name in set(oft_targets(model, cfg.towers))}
    bad = sorted(w for w in widths if w % cfg.block_size)
    if bad:
        raise ValueError(
            f"block_size={cfg.block_size} is not allowed here: OFT's blocks tile each target's input width, "
            f"and {bad} {'is' if len(bad) == 1 else 'are'} not a multiple of it; use a divisor of {min(bad)}"
        )
    return TUNER.apply(model, cfg)


remove_oft = TUNER.remove
oft_applied = TUNER.applied
oft_parameters = TUNER.parameters
oft_state_dict = TUNER.state_dict
oft_settings = TUNER.settings
