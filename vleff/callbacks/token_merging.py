"""``TokenMerging``: ToMe on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.TokenMerging(r=16)])
>>> trainer.fit(model, datamodule)        # the LightningModule is not edited

ToMe is applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights
are restored) and stays applied after ``fit`` so the trained model is the cheap one; call
``vleff.remove_tome(model)`` to get the plain forward back, and ``vleff.apply_tome`` before
``load_from_checkpoint``-ed models are used (ToMe adds no parameters, so the weights load
either way). The r schedule is saved in checkpoints and continues on resume.
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.tokens.schedule import RSchedule
from vleff.tokens.tome import RSpec, apply_tome, remove_tome, set_tome_r, tome_r


class TokenMerging(pl.Callback):
    """Apply ToMe to every supported image tower of the LightningModule.

    Args:
        r: tokens merged per block: int, per-block list, or ``(r, inflection)`` ramp.
        prop_attn: proportional attention (``+log size`` on attention logits).
        trace_source: keep source maps (for visualising merge groups).
        schedule: ``"constant"`` or ``"linear"`` (r grows from 0 over ``warmup_steps``).
        warmup_steps: optimizer steps of the linear warm-up.
        remove_on_teardown: restore the plain forward when the run ends.
    """

    def __init__(self, r: RSpec = 16, prop_attn: bool = True, trace_source: bool = False,
                 schedule: str = "constant", warmup_steps: int = 0, remove_on_teardown: bool = False) -> None:
        super().__init__()
        self.schedule = RSchedule(r=r, schedule=schedule, warmup_steps=warmup_steps)
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.remove_on_teardown = remove_on_teardown
        self.current_r: list[int] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(r=str(self.schedule.r))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        apply_tome(pl_module, r=0, prop_attn=self.prop_attn, trace_source=self.trace_source)
        self._update(pl_module, trainer.global_step if stage == "fit" else self.schedule.warmup_steps)

    def _update(self, pl_module: pl.LightningModule, step: int) -> None:
        depth = len(tome_r(pl_module))
        r = self.schedule.r_at(step, depth)
        if r != self.current_r:
            set_tome_r(pl_module, r)
            self.current_r = r

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._update(pl_module, trainer.global_step)
        if self.current_r:
            pl_module.log("tome/r_mean", sum(self.current_r) / len(self.current_r), on_step=True, on_epoch=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.remove_on_teardown:
            remove_tome(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "current_r": self.current_r}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.schedule = RSchedule.from_state_dict(state_dict["schedule"])
        self.current_r = None  # re-applied from the restored global step at the next batch
