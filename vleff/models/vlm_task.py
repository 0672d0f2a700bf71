"""``VisionLanguageTask``: a LightningModule that trains a :class:`VisionLanguageModel` on
caption / question-answer text (the digits task of :mod:`vleff.data.digits_vlm`).

Loss: next-token cross entropy on the target tokens. Validation: greedy generation of the
target's length (the model's own ``generate``, KV cache) and the accuracy of the digit word.
With ``train_host=False`` only the visual prompt is trained (the prefix projector, or MemVP's
parameters — applied at construction or by the ``MemVP`` callback in ``setup``), the paper's
setting of a frozen LM and a frozen vision tower.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from vleff.checks import check_bool, check_choice, check_number
from vleff.data.digits_vlm import DIGIT_TOKEN, TASKS, answer_position, prompt
from vleff.models.vlm import VisionLanguageModel

__all__ = ["VisionLanguageTask"]


class VisionLanguageTask(pl.LightningModule):
    """Train ``model`` on batches ``(images, input_ids, labels, digits)``; logs ``train/loss`` and ``val/acc``."""

    def __init__(
        self, model: VisionLanguageModel, task: str = "qa", lr: float = 1e-3, train_host: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(model, VisionLanguageModel):
            raise TypeError(f"model must be a VisionLanguageModel, got {type(model).__name__}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.task = check_choice("task", task, TASKS)
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.train_host = check_bool("train_host", train_host)
        if not train_host:
            model.freeze_host()

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        return self.model(images, input_ids, labels=labels)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, ids, labels, _ = batch
        loss = self.model(images, ids, labels=labels)["loss"]
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def predict_digits(self, images: torch.Tensor) -> torch.Tensor:
        """The digit each image's generated answer names (``-1`` when it names none)."""
        p = torch.tensor(prompt(self.task), device=images.device).expand(images.shape[0], -1)
        pos = answer_position(self.task)
        tokens = self.model.generate(images, p, max_new_tokens=pos + 1)[:, pos]
        match = tokens[:, None] == DIGIT_TOKEN.to(tokens.device)[None]
        return torch.where(match.any(1), match.float().argmax(1), torch.full_like(tokens, -1))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, _, _, digits = batch
        acc = (self.predict_digits(images) == digits).float().mean()
        self.log("val/acc", acc, prog_bar=True, batch_size=images.shape[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(
                "VisionLanguageTask: no parameter requires grad (frozen host and no visual prompt "
                "parameters: apply MemVP, or use visual_prompt='prefix')"
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
