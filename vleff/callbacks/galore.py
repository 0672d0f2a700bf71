"""Lightning callback: train with GaLore without touching ``configure_optimizers``.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.GaLore(rank=128)])

The AdamW/Adam optimizer the module returns is converted to :class:`vleff.memory.GaLoreAdamW`
with the same groups, lr, betas, eps and weight decay; the LR scheduler keeps driving it.
Users who build their own optimizer use :class:`vleff.callbacks.memory_mixins.GaLoreMixin`
(or :func:`vleff.memory.galore_param_groups`) instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.callbacks.optimizer_swap import check_strategy, swap_optimizers, user_optimizers
from vleff.memory.convert import galore_from_optimizer
from vleff.memory.galore import PROJ_TYPES
from vleff.memory.selection import DEFAULT_EXCLUDE

__all__ = ["GaLore"]


class GaLore(Callback):
    """Convert the module's AdamW-family optimizer(s) to GaLore at fit start.

    Args:
        rank: rank ``r`` of the projected moments (clamped to the matrix size).
        update_proj_gap: steps between SVD refreshes (``T``).
        scale: ``α`` applied to the back-projected update.
        proj_type: ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"``.
        targets: regular expressions on parameter names (default: every trainable 2-D weight).
        exclude: names left out (default :data:`vleff.memory.DEFAULT_EXCLUDE`: embeddings,
            norms, class tokens, the CLIP temperature).
    """

    def __init__(self, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 targets: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank={rank!r} is not allowed; use a positive int")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
            raise ValueError(f"update_proj_gap={update_proj_gap!r} is not allowed; use a positive int")
        if not scale > 0:
            raise ValueError(f"scale={scale!r} is not allowed; it must be > 0")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={proj_type!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.proj_type = proj_type
        self.targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        self.exclude = list(exclude) if isinstance(exclude, (list, tuple)) else exclude

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer, "GaLore")
        if not user_optimizers(trainer):
            raise RuntimeError("GaLore converts the optimizer configure_optimizers returns, but it returned none")

        def convert(opt: Any) -> Any:
            return galore_from_optimizer(opt, pl_module, rank=self.rank, update_proj_gap=self.update_proj_gap,
                                         scale=self.scale, proj_type=self.proj_type, targets=self.targets,
                                         exclude=self.exclude)

        swap_optimizers(trainer, convert)
