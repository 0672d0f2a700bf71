"""Child-Tuning_D (Xu et al., EMNLP 2021, "Raise a Child in Large Language Model"), the
task-driven variant: the Fisher information of the training data selects a fixed "child network"
of the encoder blocks' entries; only their gradients reach the optimizer, every other parameter
of the model (embeddings, final norm, head) updates in full.

**Not parameter-efficient.** The whole model updates and is stored (decoupled weight decay even
moves the masked entries); Child-Tuning is a regulariser of full fine-tuning, not a way to train
less. Nothing is frozen and nothing is added: the forward is the model's own.

As the reference (``ChildTuningD.py: calculate_fisher``, ``ChildTuningOptimizer.py:
ChildTuningAdamW.step`` in mode ``ChildTuning-D``):

* the Fisher: one pass over the training data at the training batch size (the model in train
  mode); for each batch, each masked parameter's gradient clipped to ``max_grad_norm`` on its own
  (``clip_grad_norm_`` per parameter: ``g · min(1, max_grad_norm / (‖g‖ + 1e-6))``), squared
  and averaged over the batches;
* which entries: only the encoder layers' parameters (the reference's ``"layer" in name``; in
  vleff the parameters of the towers' blocks as their adapters list them: timm's ``blocks.``,
  open_clip's ``resblocks``, Hugging Face's ``layers`` / ``layer``), ranked together: **one joint
  threshold**, the ``(1 − reserve_p)`` percentile (numpy's linear interpolation), keeps the
  entries at or above it (:func:`vleff.side.selection.percentile_masks`); the mask is fixed;
* training: the masked gradient (``grad · mask``, no rescaling) before the optimizer's moments;
  weight decay on every entry. Default ``reserve_p = 0.3`` (``run.sh``).

Where the masking happens: with Lightning, in ``on_before_optimizer_step`` (any optimizer;
:mod:`vleff.lightning.selection`); in plain PyTorch, an optimizer step pre-hook
(:func:`vleff.side.selection.attach_masked_step`).

>>> vleff.apply_child_tuning_d(model, batches=train_batches, loss_fn=loss)           # select now
>>> vleff.apply_child_tuning_d(model); vleff.select_child_tuning_d(model, batches, loss_fn)  # or later
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.checks import check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import selection as sel

NAME = "child_tuning_d"
LABEL = "Child-Tuning_D"
TOWERS = ("image", "text")


@dataclass
class ChildTuningDConfig(MethodConfig):
    """Child-Tuning_D's settings.

    Attributes:
        reserve_p: fraction of the blocks' entries whose gradients pass (the reference's
            ``reserve_p``, 0.3 in ``run.sh``), in ``(0, 1]``.
        max_grad_norm: each parameter's gradient is clipped to this norm before squaring in the
            Fisher pass (the reference passes its training ``max_grad_norm``: Hugging Face's 1.0).
        fisher_batches: training batches the callback's Fisher pass reads at fit start;
            ``None`` (default): one whole pass over the training dataloader, as the reference.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    reserve_p: float = 0.3
    max_grad_norm: float = 1.0
    fisher_batches: int | None = None
    towers: str = "image"

    def __post_init__(self) -> None:
        self.reserve_p = check_number("reserve_p", self.reserve_p, low=0.0, high=1.0, low_open=True)
        self.max_grad_norm = check_number("max_grad_norm", self.max_grad_norm, low=0.0, low_open=True)
        if self.fisher_batches is not None:
            self.fisher_batches = check_int("fisher_batches", self.fisher_batches, low=1)
        check_towers(self.towers, TOWERS)


def masked_names(model: nn.Module, towers: str = "image") -> list[str]:
    """Full names of the parameters Child-Tuning_D ranks and masks: those inside the towers'
    blocks (the reference's encoder ``layer`` parameters)."""
    return list(sel.block_parameters(model, sel.chosen_towers(model, towers)))


def apply_child_tuning_d(
    model: nn.Module,
    config: ChildTuningDConfig | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **settings: Any,
) -> nn.Module:
    """Child-Tuning_D on the towers ``towers`` names, in place: no flag, weight or forward
    changes; with ``batches`` and ``loss_fn`` the mask is selected at once
    (:func:`select_child_tuning_d`), else it is pending and the first masked step refuses to run
    without it. Applying again replaces. :func:`remove_child_tuning_d` undoes it exactly.

    Raises:
        TypeError: no tower ``towers`` names.
        ValueError: a bad setting; ``batches`` without ``loss_fn`` or the reverse; another method
            that chooses what trains is applied.
    """
    cfg = ChildTuningDConfig.build(config, **settings)
    if (batches is None) != (loss_fn is None):
        raise ValueError("batches and loss_fn: pass both (select the mask now) or neither (select it later)")
    if child_tuning_d_applied(model):
        remove_child_tuning_d(model)
    chosen = sel.chosen_towers(model, cfg.towers)
    names = masked_names(model, cfg.towers)
    refuse_applied_conflicts(model, NAME)
    sel.select_parameters(model, NAME, LABEL, chosen, None, cfg.as_dict(), train_head=False)
    sel.record_of(model, NAME)["masked"] = names
    if batches is not None and loss_fn is not None:
        select_child_tuning_d(model, batches, loss_fn)
    return model


def select_child_tuning_d(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
    """Select Child-Tuning_D's entries: the Fisher of the blocks' parameters over ``batches``
    (``loss_fn(batch) -> scalar training loss``; per batch, each parameter's gradient clipped to
    ``max_grad_norm``, squared, averaged), one joint ``(1 − reserve_p)`` percentile threshold.

    Raises:
        ValueError: Child-Tuning_D is not applied, or ``batches`` is empty.
    """
    target, masked = sel.ranked_parameters(model, NAME, LABEL)
    settings = target.__dict__[sel.STATE_ATTR]["settings"]
    scores, units = sel.fisher_information(
        masked, loss_fn, batches, per_sample=False, max_grad_norm=settings["max_grad_norm"]
    )
    fisher = {n: s / units for n, s in scores.items()}  # the reference's average (the threshold is scale-free)
    sel.set_masks(target, NAME, sel.percentile_masks(fisher, settings["reserve_p"]))


def remove_child_tuning_d(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_child_tuning_d`: the record and mask gone (flags were never changed)."""
    return sel.release_parameters(model, NAME, LABEL)


def child_tuning_d_applied(model: nn.Module) -> bool:
    return sel.selected_in(model, NAME)


def child_tuning_d_settings(model: nn.Module) -> dict[str, Any]:
    return sel.applied_settings(model, NAME)


def child_tuning_d_masks(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The fixed masks (name -> bool tensor), or ``None`` while the selection is pending."""
    return sel.masks_of(model, NAME)
