"""``LoRA``: ``peft`` LoRA adapters on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LoRA(r=8)])

Applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights are
restored, so the adapters exist when a checkpoint loads); only the adapters (and a timm
classifier head with ``train_head``) train. See :mod:`vleff.side.lora` for the targets and where
``peft`` cannot wrap a module. Checkpoints hold the whole model (the base weights' keys are
renamed by ``peft``: ``...qkv.base_layer.weight``).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.checks import check_bool, check_int, check_number
from vleff.side.lora import apply_lora, lora_applied


class LoRA(pl.Callback):
    """Args: ``r`` (rank), ``alpha`` (scale ``alpha / r``), ``dropout`` (on the adapter input),
    ``train_head`` (keep a timm classifier head trainable), ``init_from`` (a checkpoint or
    ``state_dict`` of the trained model, loaded in ``setup`` before the adapters are added)."""

    def __init__(self, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, train_head: bool = True,
                 init_from: str | None = None) -> None:
        super().__init__()
        self.r = check_int("r", r, low=1)
        self.alpha = check_number("alpha", alpha, low=0.0, low_open=True)
        self.dropout = check_number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.train_head = check_bool("train_head", train_head)
        self.init_from = None if init_from is None else str(init_from)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not lora_applied(pl_module):
            if stage == "fit" and self.init_from is not None:
                from vleff.callbacks.side import load_trained_backbone

                load_trained_backbone(pl_module, self.init_from)
            apply_lora(pl_module, self.r, self.alpha, self.dropout, self.train_head)

    def state_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha}
