"""FishMask (Sung et al., NeurIPS 2021, "Training Neural Networks with Fixed Sparse Masks"): the
empirical Fisher information selects a fixed global top-k of the backbone's entries; only they train.

As the reference (varunnair18/FISH, ``run_glue_sparse_update.py``: ``calculate_the_importance_label``
and ``create_mask_gradient``, run with ``label-square``): the gradient of the loss at the true label
for **each sample** (a batch-size-1 loader), squared and summed over the samples (1,024 in the
reference); one **global** ranking over every non-classifier parameter; the ``k`` largest entries
kept; the classifier trains in full. The mask is fixed for the whole run.

In vleff the ranked parameters are every parameter of the chosen towers except the classifier
head, and ``k = ⌊keep_ratio · |ranked|⌋`` (the reference takes ``keep_ratio · |θ| − |classifier|``,
the head counted inside the budget: with ViT-B/16's 769,000-parameter ImageNet head that would be
negative at 0.5 %; ``docs/fidelity.md``). Training: the masked gradients are zeroed before the
update (as the reference's ``SparseUpdateTrainer``) **and** the masked-off entries are put back
after every optimizer step, so AdamW's weight decay (the reference runs with wd 0) cannot move
them either (:func:`vleff.side.selection.attach_masked_step`).

>>> vleff.apply_fishmask(model, keep_ratio=0.005, batches=loader_batches, loss_fn=loss)   # select now
>>> vleff.apply_fishmask(model, keep_ratio=0.005); vleff.select_fishmask(model, batches, loss_fn)  # or later
>>> handles = vleff.side.selection.attach_masked_step(optimizer, model)  # plain PyTorch training loops
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vleff.checks import check_bool, check_int, check_number, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side import selection as sel

NAME = "fishmask"
LABEL = "FishMask"
TOWERS = ("image", "text")


@dataclass
class FishMaskConfig(MethodConfig):
    """FishMask's settings.

    Attributes:
        keep_ratio: fraction of the ranked entries (the towers' parameters, head excluded) that
            train (the reference's 0.5 %).
        fisher_batches: training batches the callback's Fisher pass reads at fit start (the
            reference reads 1,024 samples: 64 batches of 16).
        per_sample: squared gradients per sample (the reference's batch-size-1 loader) or per batch.
        train_head: keep the towers' classifier heads trainable in full (the reference's classifier).
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = NAME
    keep_ratio: float = 0.005
    fisher_batches: int = 64
    per_sample: bool = True
    train_head: bool = True
    towers: str = "image"

    def __post_init__(self) -> None:
        self.keep_ratio = check_number("keep_ratio", self.keep_ratio, low=0.0, high=1.0, low_open=True)
        self.fisher_batches = check_int("fisher_batches", self.fisher_batches, low=1)
        self.per_sample = check_bool("per_sample", self.per_sample)
        self.train_head = check_bool("train_head", self.train_head)
        check_towers(self.towers, TOWERS)


def ranked_names(model: nn.Module, towers: str = "image") -> list[str]:
    """Full names of the parameters FishMask ranks: the towers' parameters, the heads left out."""
    chosen = sel.chosen_towers(model, towers)
    heads = sel.head_parameters(model, chosen)
    return [n for n in sel.tower_parameters(model, chosen) if n not in heads]


def apply_fishmask(
    model: nn.Module,
    config: FishMaskConfig | None = None,
    batches: Iterable[Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **settings: Any,
) -> nn.Module:
    """FishMask on the towers ``towers`` names, in place: the ranked parameters (and the heads
    with ``train_head``) require grad, everything else is frozen; with ``batches`` and
    ``loss_fn`` the mask is selected at once (:func:`select_fishmask`), else it is pending and the
    first optimizer step refuses to run without it. Applying again replaces.
    :func:`remove_fishmask` undoes it exactly.

    Raises:
        TypeError: no tower ``towers`` names.
        ValueError: another method that chooses the trained parameters is applied; ``batches``
            without ``loss_fn`` or the reverse.
    """
    cfg = FishMaskConfig.build(config, **settings)
    if (batches is None) != (loss_fn is None):
        raise ValueError("batches and loss_fn: pass both (select the mask now) or neither (select it later)")
    if fishmask_applied(model):
        remove_fishmask(model)
    chosen = sel.chosen_towers(model, cfg.towers)
    names = ranked_names(model, cfg.towers)
    refuse_applied_conflicts(model, NAME)
    sel.select_parameters(model, NAME, LABEL, chosen, names, cfg.as_dict(), cfg.train_head)
    record = sel.record_of(model, NAME)
    record["masked"], record["keep_unselected"] = names, True
    if batches is not None and loss_fn is not None:
        select_fishmask(model, batches, loss_fn)
    return model


def keep_count(total: int, keep_ratio: float) -> int:
    """Entries FishMask keeps among ``total`` ranked ones: ``⌊keep_ratio · total⌋``."""
    return int(keep_ratio * total)


def select_fishmask(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], torch.Tensor]) -> None:
    """Select FishMask's entries: the empirical Fisher of the ranked parameters over ``batches``
    (``loss_fn(batch) -> scalar loss at the true labels``; per sample unless ``per_sample=False``),
    the global top ``⌊keep_ratio · |ranked|⌋`` kept.

    Raises:
        ValueError: FishMask is not applied, or ``batches`` is empty.
    """
    target, ranked = sel.ranked_parameters(model, NAME, LABEL)
    record = target.__dict__[sel.STATE_ATTR]
    scores, _ = sel.fisher_information(ranked, loss_fn, batches, per_sample=record["settings"]["per_sample"])
    total = sum(p.numel() for p in ranked.values())
    sel.set_masks(target, NAME, sel.top_k_masks(scores, keep_count(total, record["settings"]["keep_ratio"])))


def remove_fishmask(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_fishmask`: the ``requires_grad`` flags as before, masks and hooks gone."""
    return sel.release_parameters(model, NAME, LABEL)


def fishmask_applied(model: nn.Module) -> bool:
    return sel.selected_in(model, NAME)


def fishmask_settings(model: nn.Module) -> dict[str, Any]:
    return sel.applied_settings(model, NAME)


def fishmask_masks(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The fixed masks (name -> bool tensor), or ``None`` while the selection is pending."""
    return sel.masks_of(model, NAME)
