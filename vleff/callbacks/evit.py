"""Lightning callback: train or fine-tune with EViT token reorganisation.

``setup`` applies :func:`vleff.tokens.evit.apply_evit` to every image tower of the
LightningModule. The keep rate follows :class:`vleff.tokens.evit.EViTSchedule`: 1 until
``start_epoch``, then a cosine (updated every training batch) down to ``keep_rate`` at
``end_epoch`` (default: the trainer's ``max_epochs``). Validation and test use the rate of
the latest training step (the target once the schedule has finished). The current rate is
in the callback's checkpoint state, so a resumed run continues the schedule.
"""
from __future__ import annotations

from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.tokens.common import hooks_named
from vleff.tokens.evit import HOOK_NAME, EViTSchedule, apply_evit, set_evit_keep_rate
from vleff.tokens.pruning import check_ratio


class EViT(Callback):
    """EViT (keep the tokens the cls token attends to, fuse the rest) for an existing LightningModule.

    Args:
        keep_rate: target fraction of non-prefix tokens kept at each location, in (0, 1].
        locations: block indices (default three evenly spaced, ``(3, 6, 9)`` for depth 12).
        fuse: fuse the pruned tokens into one token.
        start_epoch: keep everything until this epoch (the paper warms up this way).
        end_epoch: epoch at which the cosine reaches ``keep_rate`` (default ``max_epochs``).
        log: log the current keep rate as ``evit/keep_rate``.
    """

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] | None = None, fuse: bool = True,
                 start_epoch: float = 0.0, end_epoch: float | None = None, log: bool = True) -> None:
        self.target = check_ratio("keep_rate", keep_rate)
        self.locations = None if locations is None else list(locations)
        self.fuse = fuse
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.log = log
        EViTSchedule(self.target, start_epoch, end_epoch)  # validate now
        self.schedule: EViTSchedule | None = None
        self.current: float | None = None  # set in setup (or restored from a checkpoint)
        self._module: pl.LightningModule | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        end = self.end_epoch
        if end is None:
            end = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else self.start_epoch
        self.schedule = EViTSchedule(self.target, self.start_epoch, end)
        if self.current is None:  # fit starts the schedule; validate/test/predict use the target
            self.current = self.schedule(0.0) if stage == "fit" else self.target
        if not hooks_named(pl_module, HOOK_NAME):
            apply_evit(pl_module, keep_rate=self.current, locations=self.locations, fuse=self.fuse)
        self._module = pl_module
        set_evit_keep_rate(pl_module, self.current)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        assert self.schedule is not None
        batches = trainer.num_training_batches
        frac = batch_idx / batches if isinstance(batches, int) and batches > 0 else 0.0
        self.set_keep_rate(pl_module, self.schedule(trainer.current_epoch + frac))
        if self.log:
            pl_module.log("evit/keep_rate", self.current, on_step=True, on_epoch=False, batch_size=1)

    def set_keep_rate(self, pl_module: pl.LightningModule, keep_rate: float) -> None:
        self.current = check_ratio("keep_rate", keep_rate)
        set_evit_keep_rate(pl_module, keep_rate)

    # --- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"keep_rate": self.current, "target": self.target, "start_epoch": self.start_epoch,
                "end_epoch": self.end_epoch, "locations": self.locations, "fuse": self.fuse}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current = float(state_dict["keep_rate"])
        if self._module is not None and hooks_named(self._module, HOOK_NAME):
            set_evit_keep_rate(self._module, self.current)
