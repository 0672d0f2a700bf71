"""Lightning callback: train with GaLore without touching ``configure_optimizers``.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.GaLore(rank=128)])

The AdamW/Adam optimizer the module returns is converted to :class:`vleff.memory.GaLoreAdamW`
with the same groups, lr, betas, eps and weight decay; the LR scheduler keeps driving it.
Users who build their own optimizer use :class:`vleff.callbacks.mixins.GaLoreMixin`
(or :func:`vleff.memory.galore_param_groups`) instead.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.lightning.optimizer_swap import (
    refuse_conflicting_methods,
    swap_optimizers,
    user_optimizers,
)
from vleff.lightning.strategy import check_strategy
from vleff.methods.galore import GaLoreConfig
from vleff.methods.galore.convert import galore_from_optimizer

__all__ = ["GaLore"]
from collections.abc import Sequence

from torch import nn

from vleff.methods.galore.core import DEFAULT_SVD, GaLoreAdamW
from vleff.methods.galore.selection import DEFAULT_EXCLUDE, galore_param_groups


class GaLore(Callback):
    """Convert the module's AdamW-family optimizer(s) to GaLore at fit start.

    Args:
        **settings: the fields of :class:`vleff.methods.galore.GaLoreConfig` (``rank``,
            ``update_proj_gap``, ``scale``, ``proj_type``, ``targets``, ``exclude``, ``svd``; their
            meanings and defaults are documented there, their one owner).

    All arguments are checked here, at construction, so a bad config fails before training.
    """

    #: the method config whose fields ``**settings`` takes (defaults and checks live there)
    settings_config = GaLoreConfig

    def __init__(self, **settings: Any) -> None:
        self.config = GaLoreConfig.build(**settings)
        for name, value in self.config.as_dict().items():
            setattr(self, name, value)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse GaLore together with MeZO before anything runs (MeZO would silently replace it)."""
        check_strategy(trainer, "galore")
        if stage == "fit":
            refuse_conflicting_methods(trainer, pl_module, "galore")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_strategy(trainer, "galore")  # the mixin's path too
        if not user_optimizers(trainer):
            raise RuntimeError("GaLore converts the optimizer configure_optimizers returns, but it returned none")

        def convert(opt: Any) -> Any:
            return galore_from_optimizer(
                opt,
                pl_module,
                rank=self.rank,
                update_proj_gap=self.update_proj_gap,
                scale=self.scale,
                proj_type=self.proj_type,
                targets=self.targets,
                exclude=self.exclude,
                svd=self.svd,
            )

        swap_optimizers(trainer, convert)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class GaLoreMixin:
    """Adds :meth:`galore_optimizer` (projected 2-D weights + plain AdamW for the rest)."""

    def galore_optimizer(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        rank: int = GaLoreConfig.rank,  # the config owns the defaults (the callback's too)
        update_proj_gap: int = GaLoreConfig.update_proj_gap,
        scale: float = GaLoreConfig.scale,
        proj_type: str = GaLoreConfig.proj_type,
        targets: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
        svd: str = DEFAULT_SVD,
    ) -> GaLoreAdamW:
        """A :class:`GaLoreAdamW` over this module: 2-D weights chosen by ``targets``/``exclude``
        projected with ``rank`` (refreshed by a ``svd`` SVD every ``update_proj_gap`` steps)."""
        if not isinstance(self, nn.Module):
            raise TypeError("GaLoreMixin must be mixed into an nn.Module (a LightningModule)")
        groups = galore_param_groups(
            self,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            targets=targets,
            exclude=exclude,
            svd=svd,
        )
        return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
