"""``VisualQueryTuning``: VQT on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.VisualQueryTuning(num_queries=1)])

VQT is applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights
are restored, so its parameters exist when a checkpoint loads), the backbone is frozen there,
and it is kept in eval mode (dropout and drop-path off) for every training batch while the
VQT module trains. At fit start any backbone weight that requires grad is refused: it would
make the frozen token stream build a graph and silently destroy the memory saving.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.checks import check_bool
from vleff.side.vqt import (MODULE_NAME, VQTConfig, _vqt_towers, apply_vqt, freeze_backbone_for_vqt, remove_vqt,
                            unfrozen_backbone_parameters, vqt_applied)


def refuse_unfrozen_backbone(module: nn.Module, train_head: bool) -> None:
    """``RuntimeError`` naming the backbone weights that require grad under VQT."""
    unfrozen = unfrozen_backbone_parameters(module, train_head)
    if unfrozen:
        shown = ", ".join(unfrozen[:5]) + (f" (+{len(unfrozen) - 5} more)" if len(unfrozen) > 5 else "")
        raise RuntimeError(
            f"VQT needs a frozen backbone, but {len(unfrozen)} backbone weight(s) require grad: {shown}. "
            "Something unfroze them after the callback froze the backbone (the module's own code, another "
            "method); a trainable backbone makes the frozen token stream build a graph and removes VQT's memory "
            "saving. Set requires_grad=False on them, or fine-tune without VQT")


def backbone_eval(module: nn.Module) -> None:
    """The VQT towers in eval mode (dropout, drop-path off), their VQT modules in train mode."""
    for tower in _vqt_towers(module):
        tower.root.eval()
        tower.root.get_submodule(MODULE_NAME).train()


class VisualQueryTuning(pl.Callback):
    """Apply VQT to the image towers of the LightningModule and train only it (and the head).

    Args:
        train_head: keep the tower's classifier head trainable (a new task needs it; it reads
            the pooled features only, so no backbone activation is saved for it).
        remove_on_teardown: restore the plain model when the run ends.
        **settings: :class:`vleff.side.vqt.VQTConfig` fields (``num_queries``, ``dropout``,
            ``towers``), validated here.
    """

    settings_config = VQTConfig

    def __init__(self, train_head: bool = True, remove_on_teardown: bool = False, **settings: Any) -> None:
        super().__init__()
        self.config = VQTConfig.build(**settings)
        self.train_head = check_bool("train_head", train_head)
        self.remove_on_teardown = check_bool("remove_on_teardown", remove_on_teardown)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not vqt_applied(pl_module):
            apply_vqt(pl_module, self.config)
        freeze_backbone_for_vqt(pl_module, train_head=self.train_head)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_unfrozen_backbone(pl_module, self.train_head)
        backbone_eval(pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        backbone_eval(pl_module)  # Lightning puts the module back in train mode after validation

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.remove_on_teardown and vqt_applied(pl_module):
            remove_vqt(pl_module)
