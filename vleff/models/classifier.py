"""``ImageClassifier``: a LightningModule around any image model, with accuracy from torchmetrics.

It is deliberately plain — cross-entropy, AdamW without decay on biases/norms, linear
warm-up then cosine — so that a vleff callback added to the ``Trainer`` is the only
difference between a baseline run and a method run.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vleff.methods.galore.selection import wants_decay
from vleff.models.factory import build_model, image_input_size

__all__ = ["ImageClassifier"]


class ImageClassifier(pl.LightningModule):
    """Classify images with ``model``: a name for :func:`vleff.models.build_model` or any ``nn.Module``.

    Logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc``. Sets ``example_input_array``
    (one zero image of the model's input size) so Lightning's model summary shows the FLOPs.
    """

    def __init__(
        self,
        model: str | nn.Module = "vit_tiny_digits",
        num_classes: int = 10,
        image_size: int | None = None,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.1,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr={lr!r} must be > 0")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={warmup_fraction!r} must lie in [0, 1)")
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, str):
            model = build_model(
                model, num_classes=num_classes, image_size=image_size, pretrained=pretrained, **(model_kwargs or {})
            )
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
        self.model = model
        # one image of the model's native size: Lightning's model summary counts the forward's FLOPs with it
        size = image_input_size(model)
        if image_size is not None and size is not None:
            size = (size[0], int(image_size))
        if size is not None:
            self.example_input_array = torch.zeros(1, size[0], size[1], size[1])
        # top-1 accuracy over samples ("micro"); torchmetrics defaults to the mean of per-class accuracies
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (decay if wants_decay(name, param) else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.hparams.warmup_fraction * total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
