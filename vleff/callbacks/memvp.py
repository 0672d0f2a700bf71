"""``MemVP``: MemVP on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.MemVP(n_mem=256)])

MemVP is applied to the host inside the LightningModule (a ``VisionLanguageModel`` in
``visual_prompt="memvp"`` mode, or a Hugging Face BLIP captioning / VQA model) in ``setup``:
before ``configure_optimizers`` and before checkpoint weights are restored, so its parameters
exist when a checkpoint loads (resuming is exact). With ``freeze_host`` every other weight is
frozen there (the paper trains only the projector and the memory offsets).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.checks import check_bool
from vleff.side.memvp import MemVPConfig, apply_memvp, freeze_host_for_memvp, memvp_applied, remove_memvp


class MemVP(pl.Callback):
    """Apply MemVP to the LightningModule's host model (and freeze the host).

    Args:
        freeze_host: ``requires_grad=False`` on every weight but MemVP's.
        remove_on_teardown: restore the plain host when the run ends.
        **settings: :class:`vleff.side.memvp.MemVPConfig` fields (``n_mem``, ``scale``, ...), validated here.
    """

    settings_config = MemVPConfig

    def __init__(self, freeze_host: bool = True, remove_on_teardown: bool = False, **settings: Any) -> None:
        super().__init__()
        self.config = MemVPConfig.build(**settings)
        self.freeze_host = check_bool("freeze_host", freeze_host)
        self.remove_on_teardown = check_bool("remove_on_teardown", remove_on_teardown)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not memvp_applied(pl_module):
            apply_memvp(pl_module, self.config)
        if self.freeze_host:
            freeze_host_for_memvp(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.remove_on_teardown and memvp_applied(pl_module):
            remove_memvp(pl_module)
