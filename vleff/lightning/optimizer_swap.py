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

from vleff.optim import rebind_scheduler

__all__ = ["refuse_conflicting_methods", "swap_optimizers", "user_optimizers"]


def user_optimizers(trainer: pl.Trainer) -> list[Optimizer]:
    """The optimizers ``configure_optimizers`` returned (Lightning's placeholder left out)."""
    from lightning.pytorch.core.optimizer import _MockOptimizer

    return [opt for opt in trainer.strategy.optimizers if not isinstance(opt, _MockOptimizer)]


def refuse_conflicting_methods(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
    """``ValueError`` when another method in this run (a callback on the trainer, or the module's
    mixin) conflicts with method ``name`` by either one's declared rules (e.g. two methods that
    both replace the optimizer: whichever ran last would silently win). Only methods that replace
    the optimizer are looked for: the tower methods meet at apply time already."""
    from vleff.registry import all_methods, conflict, get_method

    me = get_method(name)
    for other in all_methods():
        if other.name == name or "replaces_optimizer" not in other.traits:
            continue
        as_callback = any(isinstance(cb, other.load_callback()) for cb in trainer.callbacks)
        as_mixin = isinstance(pl_module, other.load_mixin())
        reason = conflict(name, other.name) if as_callback or as_mixin else None
        if not reason:
            continue
        theirs = (
            f"the {other.display_name} callback"
            if as_callback
            else f"{type(pl_module).__name__}, a {other.load_mixin().__name__} module"
        )
        raise ValueError(f"the {me.display_name} callback cannot be used with {theirs}: {reason}; keep one of them")


def swap_optimizers(
    trainer: pl.Trainer, convert: Callable[[Optimizer | None], Optimizer], base_lr: float | None = None
) -> list[Optimizer]:
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
