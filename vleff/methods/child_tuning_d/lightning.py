"""``ChildTuningD``: Child-Tuning_D on the LightningModule's towers, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.ChildTuningD(reserve_p=0.3)])

At fit start the callback makes one pass over the training dataloader (or ``fisher_batches``
batches), computes the Fisher with the module's ``training_step`` loss (or ``loss_fn(module,
batch)``) and fixes the mask; the gradients are then masked in ``on_before_optimizer_step``
(before the optimizer's moments, whatever the optimizer). The mask travels in checkpoints, so a
resumed run keeps it (no new Fisher pass). Checkpoints hold the whole model (nothing is frozen).
Everything else is the selective methods' base (:class:`vleff.lightning.selection.SelectiveTuning`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from vleff.lightning.selection import SelectiveMixin, SelectiveTuning
from vleff.methods.child_tuning_d.core import ChildTuningDConfig, select_child_tuning_d


class ChildTuningD(SelectiveTuning):
    """Args: :class:`vleff.methods.child_tuning_d.core.ChildTuningDConfig`'s settings
    (``reserve_p``, ``max_grad_norm``, ``fisher_batches``, ``towers``) and the shared ones of
    :class:`vleff.lightning.selection.SelectiveTuning` (``loss_fn`` among them)."""

    method = "child_tuning_d"
    settings_config = ChildTuningDConfig

    def fisher_batches(self) -> int | None:
        return self.config.fisher_batches

    def fisher_select(self, target: nn.Module, batches: Iterable[Any], loss: Callable[[Any], torch.Tensor]) -> None:
        select_child_tuning_d(target, batches, loss)


class ChildTuningDMixin(SelectiveMixin):
    """``use_child_tuning_d(**settings)`` in ``__init__`` once the backbone exists: the mask is
    selected at fit start (one pass over the training dataloader, or ``fisher_batches``) with the
    module's ``training_step`` loss, and the gradients are masked in ``on_before_optimizer_step``
    (as :class:`ChildTuningD`)."""

    def use_child_tuning_d(self, module: Any = None, **settings: Any) -> None:
        config = ChildTuningDConfig.build(**settings)
        self._use_selection("child_tuning_d", config, module, select_child_tuning_d, config.fisher_batches)
