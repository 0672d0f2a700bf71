"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms of the backbone (and the task head).

Which biases, as the reference (benzakenelad/BitFit ``glue_evaluator.py``, ``BIAS_TERMS_DICT``'s
``"all"``): every bias — the attention's query/key/value and output projections, both MLP
layers, the LayerNorms (their ``bias``; the scales stay frozen) and the embeddings' projection —
plus the new classifier head in full. In vleff a bias is every parameter of the chosen towers
whose name ends in ``bias`` (open_clip's fused ``in_proj_bias`` included); the head is the
tower's classifier head (timm's ``head``), trained with ``train_head``.

No parameter is added and the forward is untouched: the model starts exactly at the frozen model
and :func:`remove_bitfit` only restores the ``requires_grad`` flags. ViT-B/16: 102,912 trainable
biases (0.119 % of the backbone) besides the head.

>>> vleff.apply_bitfit(model)           # only biases (and the head) require grad
>>> vleff.remove_bitfit(model)          # the flags as they were
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vleff.checks import check_bool, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import selection as sel

NAME = "bitfit"
LABEL = "BitFit"
TOWERS = ("image", "text")


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit's settings.

    Attributes:
        train_head: keep the towers' classifier heads trainable (a new task needs one).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    train_head: bool = True
    towers: str = "image"

    def __post_init__(self) -> None:
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def bias_names(model: nn.Module, towers: str = "image") -> list[str]:
    """Full names of the biases BitFit trains in ``towers`` of ``model`` (the heads left out)."""
    chosen = sel.chosen_towers(model, towers)
    heads = sel.head_parameters(model, chosen)
    return [n for n in sel.tower_parameters(model, chosen) if n.rsplit(".", 1)[-1].endswith("bias") and n not in heads]


def apply_bitfit(model: nn.Module, config: BitFitConfig | None = None, **settings: Any) -> nn.Module:
    """Train only the biases of the towers ``towers`` names (and their heads with
    ``train_head``), in place; applying again replaces. :func:`remove_bitfit` undoes it exactly.

    Raises:
        TypeError: no tower ``towers`` names.
        ValueError: another method that chooses the trained parameters is applied.
    """
    cfg = BitFitConfig.build(config, **settings)
    if bitfit_applied(model):
        remove_bitfit(model)
    chosen = sel.chosen_towers(model, cfg.towers)
    names = bias_names(model, cfg.towers)
    refuse_applied_conflicts(model, NAME)
    return sel.select_parameters(model, NAME, LABEL, chosen, names, cfg.as_dict(), cfg.train_head)


def remove_bitfit(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_bitfit`: the ``requires_grad`` flags as before, the input hooks gone."""
    return sel.release_parameters(model, NAME, LABEL)


def bitfit_applied(model: nn.Module) -> bool:
    return sel.selected_in(model, NAME)


def bitfit_settings(model: nn.Module) -> dict[str, Any]:
    return sel.applied_settings(model, NAME)


def bitfit_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train under BitFit (biases and heads)."""
    return sel.trainable_parameters(model, NAME)


def bitfit_state_dict(model: nn.Module) -> dict[str, Any]:
    """The trained biases' and heads' state: what a BitFit checkpoint keeps."""
    return sel.trainable_state_dict(model, NAME)
