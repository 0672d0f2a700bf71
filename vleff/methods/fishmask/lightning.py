"""``FishMask``: the Fisher-selected entries of the LightningModule's towers train, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.FishMask(keep_ratio=0.005, fisher_batches=64)])

At fit start the callback reads ``fisher_batches`` training batches, computes the empirical Fisher
with the module's ``training_step`` loss (or ``loss_fn(module, batch)``) and fixes the mask; the
mask is kept in checkpoints, so a resumed run trains the same entries. Everything else is the
selective methods' base (:class:`vleff.lightning.selection.SelectiveTuning`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vleff.lightning.selection import SelectiveMixin, SelectiveTuning
from vleff.methods.fishmask.core import FishMaskConfig, select_fishmask


class FishMask(SelectiveTuning):
    """Args: :class:`vleff.methods.fishmask.core.FishMaskConfig`'s settings (``keep_ratio``,
    ``fisher_batches``, ``per_sample``, ``train_head``, ``towers``) and the shared ones of
    :class:`vleff.lightning.selection.SelectiveTuning` (``loss_fn`` among them)."""

    method = "fishmask"
    settings_config = FishMaskConfig

    def fisher_batches(self) -> int:
        return self.config.fisher_batches

    def fisher_select(self, target: nn.Module, batches: list[Any], loss: Callable[[Any], torch.Tensor]) -> None:
        select_fishmask(target, batches, loss)


class FishMaskMixin(SelectiveMixin):
    """``use_fishmask(**settings)`` in ``__init__`` once the backbone exists: the flags are set at
    once, the mask is selected at fit start on ``fisher_batches`` training batches with the
    module's ``training_step`` loss, and every optimizer gets the masked step (as :class:`FishMask`)."""

    def use_fishmask(self, module: Any = None, **settings: Any) -> None:
        config = FishMaskConfig.build(**settings)
        self._use_selection("fishmask", config, module, select_fishmask, config.fisher_batches)
