"""``Reversible``: reversible blocks on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.Reversible(coupling="meft")])
>>> trainer.fit(model, datamodule)        # the LightningModule is not edited

The stack is made reversible in ``setup`` (before ``configure_optimizers`` and before
checkpoint weights are restored, so MEFT's adapters exist when their weights load) and
stays so after ``fit``: the trained weights belong to the reversible network, so
``vleff.apply_reversible`` must be called with the same settings before a
``load_from_checkpoint``-ed model is evaluated (the plain forward is a different function).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.memory.reversible import ReversibleConfig, apply_reversible, remove_reversible, reversible_applied

__all__ = ["Reversible"]


class Reversible(pl.Callback):
    """Run the LightningModule's towers (timm ViT/DeiT, open_clip, HF CLIP) as reversible stacks.

    Args:
        remove_on_teardown: restore the plain forward when the run ends.
        **settings: :class:`vleff.memory.reversible.ReversibleConfig` fields (``coupling``,
            ``lam``, ``beta``, ``towers``, ``adapter``, ``streams``, ``balance``), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    settings_config = ReversibleConfig

    def __init__(self, remove_on_teardown: bool = False, **settings: Any) -> None:
        super().__init__()
        self.config = ReversibleConfig.build(**settings)
        if not isinstance(remove_on_teardown, bool):
            raise ValueError(f"remove_on_teardown={remove_on_teardown!r} is not allowed; use True or False")
        self.remove_on_teardown = remove_on_teardown

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not reversible_applied(pl_module):
            apply_reversible(pl_module, self.config)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.remove_on_teardown and reversible_applied(pl_module):
            remove_reversible(pl_module)
