"""Lightning callback and mixin of MuE: applied in ``setup`` (before ``configure_optimizers`` and
before checkpoint weights load), the same settings kept for every stage, a method already applied
with other settings refused, the method recorded in checkpoints (``restore_methods``); ``module=``
picks the model when the LightningModule holds several (the rules of every method callback,
:mod:`vleff.lightning.targets`).

MuE's exits need a model whose head reads early layers well: MuE trains with a **layer-wise loss**,
the task loss summed, unweighted, over every layer through the shared head (for OFA's decoder:
``output_layer(layer_norm(h_l))``). For timm ViT classifiers the callback offers it
(``layerwise_loss=True``, vleff's addition: MuE puts no loss on its encoders): each block's output
but the last goes through the model's own final norm and head (``forward_head(norm(h_l))``), and the
cross-entropy against the batch's labels is added to the user's loss as ``mue/layerwise`` (the
last block's loss is the user's own). For an image-text model trained contrastively (open_clip
CLIP, Hugging Face ``CLIPModel``) the same option trains each exit with the contrastive loss
instead: the embedding the tower would return from block ``l`` against the other tower's final
embedding (:mod:`vleff.methods.mue.contrastive`; no labels needed). Exits run only in evaluation, as the reference's
``is_train=False``. For a decoder (BLIP captioning's ``text_decoder``, ``decoder_threshold``) MuE's
own loss is :func:`vleff.methods.mue.mue_decoder_loss`: call it in your ``training_step`` on the
decoder's ``output_hidden_states`` in place of the language-model loss.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import find_towers, get_patch
from vleff.backbones.patch import in_backward
from vleff.checks import check_bool
from vleff.lightning.aux_loss import attach_aux_loss, detach_aux_loss
from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.mue.contrastive import ContrastiveLayerwiseLoss, require_grad
from vleff.methods.mue.core import MuEConfig, apply_mue

LAYERWISE_LOSS = "mue/layerwise"


class LayerwiseLoss:
    """Forward hooks on every block but the last of a timm ViT classifier that add the cross-entropy
    of ``forward_head(norm(h_l))`` against the labels given to :meth:`set_labels` to the tower's aux
    losses (training forwards only; a block recomputed by gradient checkpointing adds nothing)."""

    def __init__(self, model: nn.Module) -> None:
        towers = [t for t in find_towers(model) if t.modality == "image"]
        tower = towers[0] if towers else None
        root = tower.root if tower is not None else None
        if (
            tower is None
            or tower.classifier_head() is None
            or isinstance(tower.classifier_head(), nn.Identity)  # timm with num_classes=0: features, no classes
            or tower.classifier_heads != 1
            or not callable(getattr(root, "forward_head", None))
            or not isinstance(getattr(root, "norm", None), nn.Module)
        ):
            have = tower.describe() if tower is not None else f"no image tower in {type(model).__name__}"
            raise TypeError(
                f"MuE layerwise_loss=True reads each block's output through the model's final norm and its one "
                f"classifier head (a timm ViT classifier's norm and forward_head) or, for an image-text model, its "
                f"contrastive projections (open_clip CLIP, transformers CLIPModel); {have} has neither. Train the "
                "early exits with your own layer-wise loss, or pass layerwise_loss=False"
            )
        self.tower, self.root = tower, root
        self.labels: torch.Tensor | None = None
        blocks = tower.blocks()
        self.handles = [block.register_forward_hook(self._hook) for block in blocks[:-1]]

    def set_labels(self, labels: torch.Tensor | None) -> None:
        self.labels = labels

    def _hook(self, block: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self.labels is None or not block.training or in_backward():
            return
        require_grad(" (timm: timm.layers.set_reentrant_ckpt(False))")
        patch = get_patch(self.tower.root)
        if patch is None or patch.state is None:
            return
        logits = self.root.forward_head(self.root.norm(output))
        patch.state.add_aux_loss(LAYERWISE_LOSS, F.cross_entropy(logits.float(), self.labels))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def layerwise_loss_for(model: nn.Module) -> LayerwiseLoss | ContrastiveLayerwiseLoss:
    """The layer-wise loss ``model`` can take: contrastive for an image-text pair, the classifier's
    cross-entropy otherwise (``TypeError`` naming both when it has neither)."""
    from vleff.backbones.pairs import pairs_in

    if not pairs_in(model):
        return LayerwiseLoss(model)
    return ContrastiveLayerwiseLoss(model, LAYERWISE_LOSS)


def batch_labels(batch: Any, labels: int | str) -> torch.Tensor:
    """The labels in ``batch`` at index or key ``labels``; ``ValueError`` naming what was found."""
    try:
        value = batch[labels]
    except (KeyError, IndexError, TypeError):
        value = None
    if not isinstance(value, torch.Tensor) or value.is_floating_point():
        raise ValueError(
            f"MuE layerwise_loss: labels={labels!r} found no integer class-label tensor in the batch (a "
            f"{type(batch).__name__}); pass labels= the index or key of the labels"
        )
    return value


class MuE(InitFromOption, RemovalOption, BudgetOption, pl.Callback):
    """MuE (per-sample early exit by layer-to-layer similarity) for an existing LightningModule.

    Args:
        module: the model to exit in: attribute path or module object (default: the one model of the
            LightningModule with a tower ``towers`` names; several are refused, listing them).
        layerwise_loss: add MuE's layer-wise loss in ``fit`` so early exits are trained: cross-entropy
            through the head of a timm ViT classifier, the contrastive loss of each exit's embedding
            for open_clip / Hugging Face CLIP (see the module docstring).
        labels: where the class labels are in a training batch (an index or a key; default 1, ``(x, y)``;
            classifiers only: the contrastive loss pairs the batch's own images and texts).
        remove_on_teardown: restore the plain forward when the run ends.
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        flops_target: set the exit threshold of every tower MuE is on so the inference FLOPs are
            this fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches at the start of ``fit``, and again when training
            ends: the trained blocks give other cosines; kept in checkpoints).
        budget_batches: how many training batches the budget is measured on.
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.mue.core.MuEConfig` fields (``image_threshold``,
            ``text_threshold``, ``towers``), validated here.
    """

    method = "mue"
    settings_config = MuEConfig

    def __init__(
        self,
        module: ModuleArg = None,
        layerwise_loss: bool = False,
        labels: int | str = 1,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        self.init_initial(init_from)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self.config = MuEConfig.build(**settings)
        self.module = check_module_arg(module)
        self.layerwise_loss = check_bool("layerwise_loss", layerwise_loss)
        if isinstance(labels, bool) or not isinstance(labels, (int, str)):
            raise ValueError(f"labels={labels!r} is not allowed; use the index or key of the batch's labels")
        self.labels = labels
        self.init_removal(remove_on_teardown)
        self._target: Any = None
        self._layerwise: LayerwiseLoss | ContrastiveLayerwiseLoss | None = None
        self._attached: pl.LightningModule | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "mue", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_mue(target, self.config))
        if self.layerwise_loss and stage == "fit" and self._layerwise is None:
            self._layerwise = layerwise_loss_for(target)
            attach_aux_loss(pl_module)
            self._attached = pl_module

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(self._layerwise, LayerwiseLoss):
            self._layerwise.set_labels(batch_labels(batch, self.labels))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(self._layerwise, LayerwiseLoss):
            self._layerwise.set_labels(None)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._layerwise is not None:
            self._layerwise.remove()
            self._layerwise = None
        if self._attached is not None:
            detach_aux_loss(self._attached)
            self._attached = None
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "mue", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.refit_budget_at_train_end(trainer, self._target if self._target is not None else pl_module)

    def state_dict(self) -> dict[str, Any]:
        # MuE has no weights of its own; a fitted budget's thresholds are kept
        return {"config": self.config.as_dict(), "budget": self.budget_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_budget_state(state_dict.get("budget", {}))


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class MuEMixin:
    """``use_mue(**settings)`` in ``__init__`` (MuE applies at once; it exits in evaluation only). For
    the layer-wise loss use the callback (``layerwise_loss=True``) or add your own."""

    def use_mue(self, module: Any = None, **settings: Any) -> None:
        config = MuEConfig.build(**settings)
        apply_mue(mixin_target(self, module, "mue", config), config)
