"""Step the trainer's learning-rate schedulers by hand, as Lightning would.

Under manual optimization (MeZO replaces the training step), Lightning steps no scheduler;
the MeZO callback steps the ``interval="step"`` ones after each update and the
``interval="epoch"`` ones at the end of each epoch, and :class:`vleff.callbacks.mixins.MeZOMixin`
does the same from the module. Both use this one function, in its own module so that neither
imports the other's private names.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl

__all__ = ["step_lr_schedulers"]


def step_lr_schedulers(trainer: pl.Trainer, interval: Literal["step", "epoch"]) -> None:
    """Step each scheduler in ``trainer.strategy.lr_scheduler_configs`` whose ``interval`` is
    ``interval`` and whose ``frequency`` divides the current count (``global_step`` for
    ``"step"``, the number of finished epochs for ``"epoch"``), as Lightning's automatic
    optimization does; a ``ReduceLROnPlateau`` gets its ``monitor`` metric and is skipped while
    that metric has not been logged."""
    if interval not in ("step", "epoch"):
        raise ValueError(f"interval={interval!r} is not allowed; use 'step' or 'epoch'")
    for config in trainer.strategy.lr_scheduler_configs:
        if config.interval != interval:
            continue
        count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
        if count % config.frequency:
            continue
        if config.reduce_on_plateau:
            metric = trainer.callback_metrics.get(config.monitor) if config.monitor else None
            if metric is not None:
                config.scheduler.step(metric)
        else:
            config.scheduler.step()
