"""Replace the optimizers Lightning built from ``configure_optimizers`` (used by GaLore and MeZO).

Lightning 2.x keeps the raw optimizers in ``trainer.strategy.optimizers`` (its setter also
rebuilds the ``LightningOptimizer`` wrappers that ``self.optimizers()`` returns) and the
schedulers in ``trainer.strategy.lr_scheduler_configs``. The swap runs in ``on_fit_start``:
after the strategy created the optimizers and before a checkpoint's optimizer state is
restored, so resuming loads the state into the converted optimizer.
"""
from __future__ import annotations

from collections.abc import Callable

import lightning.pytorch as pl
from torch.optim import Optimizer

from vleff.memory.convert import rebind_scheduler

__all__ = ["check_strategy", "refuse_galore_with_mezo", "swap_optimizers", "user_optimizers"]


def user_optimizers(trainer: pl.Trainer) -> list[Optimizer]:
    """The optimizers ``configure_optimizers`` returned (Lightning's placeholder left out)."""
    from lightning.pytorch.core.optimizer import _MockOptimizer

    return [opt for opt in trainer.strategy.optimizers if not isinstance(opt, _MockOptimizer)]


def check_strategy(trainer: pl.Trainer, saver: str) -> None:
    """Refuse strategies that shard or flatten parameters: per-matrix state cannot follow them."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel", "XLA")):
        raise RuntimeError(f"{saver} supports single-device and DDP strategies; {name} shards or flattens "
                           "parameters, which the per-matrix optimizer state cannot follow")


def refuse_galore_with_mezo(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """GaLore and MeZO both replace the optimizer; whichever runs last would silently win.

    Raises ``ValueError`` naming both when the trainer has both callbacks, or one callback
    and the module the other's mixin.
    """
    from vleff.methods.galore.lightning import GaLore, GaLoreMixin
    from vleff.methods.mezo.lightning import MeZO, MeZOMixin

    has_galore = any(isinstance(cb, GaLore) for cb in trainer.callbacks)
    has_mezo = any(isinstance(cb, MeZO) for cb in trainer.callbacks)
    if has_galore and has_mezo:
        raise ValueError("the GaLore and MeZO callbacks cannot be used together: both replace the optimizer and "
                         "MeZO (no gradients) would silently discard GaLore (a gradient optimizer); "
                         "keep one of vleff.callbacks.GaLore and vleff.callbacks.MeZO")
    if has_galore and isinstance(pl_module, MeZOMixin):
        raise ValueError(f"the GaLore callback cannot train {type(pl_module).__name__}, a MeZOMixin module: MeZO "
                         "replaces the optimizer with a gradient-free one; remove the GaLore callback or the mixin")
    if has_mezo and isinstance(pl_module, GaLoreMixin):
        raise ValueError(f"the MeZO callback on {type(pl_module).__name__}, a GaLoreMixin module, would silently "
                         "replace its GaLore optimizer; GaLore and MeZO cannot be combined: use one of them")


def swap_optimizers(trainer: pl.Trainer, convert: Callable[[Optimizer | None], Optimizer],
                    base_lr: float | None = None) -> list[Optimizer]:
    """Replace every user optimizer (or the placeholder, when there is none) by ``convert(opt)``
    and point the LR schedulers at the replacement. Returns the new optimizers."""
    strategy = trainer.strategy
    olds = user_optimizers(trainer)
    pairs = [(old, convert(old)) for old in olds] if olds else [(None, convert(None))]
    for old, new in pairs:
        if old is None:
            continue
        for config in strategy.lr_scheduler_configs:
            rebind_scheduler(config.scheduler, old, new, base_lr)
    strategy.optimizers = [new for _, new in pairs]
    return strategy.optimizers
