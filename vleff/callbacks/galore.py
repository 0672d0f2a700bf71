"""Lightning callback: train with GaLore without touching ``configure_optimizers``.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.GaLore(rank=128)])

The AdamW/Adam optimizer the module returns is converted to :class:`vleff.memory.GaLoreAdamW`
with the same groups, lr, betas, eps and weight decay; the LR scheduler keeps driving it.
Users who build their own optimizer use :class:`vleff.callbacks.memory_mixins.GaLoreMixin`
(or :func:`vleff.memory.galore_param_groups`) instead.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.callbacks.optimizer_swap import (check_strategy, refuse_galore_with_mezo, swap_optimizers,
                                            user_optimizers)
from vleff.memory.convert import galore_from_optimizer
from vleff.memory.galore import DEFAULT_SVD, PROJ_TYPES, SVD_METHODS
from vleff.memory.selection import DEFAULT_EXCLUDE, check_patterns

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
        svd: how the projection is refreshed: ``"full"`` (thin SVD) or ``"lowrank"``
            (randomized, :func:`torch.svd_lowrank`); see :func:`vleff.memory.galore_projection`.

    All arguments are checked here, at construction, so a bad config fails before training.
    """

    def __init__(self, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25, proj_type: str = "std",
                 targets: str | Sequence[str] | None = None,
                 exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE, svd: str = DEFAULT_SVD) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"GaLore: rank={rank!r} is not allowed; use a positive int (the rank of the "
                             "projected moments)")
        if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
            raise ValueError(f"GaLore: update_proj_gap={update_proj_gap!r} is not allowed; use a positive int "
                             "(steps between projection refreshes)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"GaLore: scale={scale!r} is not allowed; it must be a finite number > 0 "
                             "(alpha, the factor on the back-projected update; the paper uses 0.25)")
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={proj_type!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")
        if svd not in SVD_METHODS:
            raise ValueError(f"GaLore: svd={svd!r} is not allowed; use one of {', '.join(SVD_METHODS)}")
        check_patterns("targets", targets)
        check_patterns("exclude", exclude)
        self.rank = rank
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.proj_type = proj_type
        self.targets = list(targets) if isinstance(targets, (list, tuple)) else targets
        self.exclude = list(exclude) if isinstance(exclude, (list, tuple)) else exclude
        self.svd = svd

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse GaLore together with MeZO before anything runs (MeZO would silently replace it)."""
        if stage == "fit":
            refuse_galore_with_mezo(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer, "GaLore")
        if not user_optimizers(trainer):
            raise RuntimeError("GaLore converts the optimizer configure_optimizers returns, but it returned none")

        def convert(opt: Any) -> Any:
            return galore_from_optimizer(opt, pl_module, rank=self.rank, update_proj_gap=self.update_proj_gap,
                                         scale=self.scale, proj_type=self.proj_type, targets=self.targets,
                                         exclude=self.exclude, svd=self.svd)

        swap_optimizers(trainer, convert)
