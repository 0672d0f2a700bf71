"""LightningModule mixins: the same behaviour as the callbacks, for users who own the module.

Put the mixin first in the bases (``class MyModel(TokenMergingMixin, L.LightningModule)``) and
call ``super()`` in any Lightning hook you override that a mixin also uses, so both run.
Mixins and callbacks share one implementation (the schedule / aux-loss objects in the method
layer); only where it is triggered differs.
"""
from __future__ import annotations

from typing import Any

from vleff.tokens.schedule import RSchedule
from vleff.tokens.tome import RSpec, apply_tome, set_tome_r

_TOME_KEY = "vleff_tome_schedule"


class TokenMergingMixin:
    """ToMe configured by the module itself; schedule saved in and restored from checkpoints.

    Call :meth:`enable_token_merging` in ``__init__`` once the backbone exists.
    """

    def enable_token_merging(self, r: RSpec = 16, prop_attn: bool = True, trace_source: bool = False,
                             schedule: str = "constant", warmup_steps: int = 0) -> None:
        self._vleff_tome = RSchedule(r=r, schedule=schedule, warmup_steps=warmup_steps)
        apply_tome(self, r=0, prop_attn=prop_attn, trace_source=trace_source)
        self._apply_tome_schedule(0)

    def _apply_tome_schedule(self, step: int) -> None:
        from vleff.tokens.tome import tome_r

        depth = len(tome_r(self))
        set_tome_r(self, self._vleff_tome.r_at(step, depth))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        if getattr(self, "_vleff_tome", None) is not None:
            self._apply_tome_schedule(self.global_step)
        parent = getattr(super(), "on_train_batch_start", None)
        return parent(batch, batch_idx) if parent is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "_vleff_tome", None) is not None:
            checkpoint[_TOME_KEY] = self._vleff_tome.state_dict()
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if _TOME_KEY in checkpoint and getattr(self, "_vleff_tome", None) is not None:
            self._vleff_tome = RSchedule.from_state_dict(checkpoint[_TOME_KEY])
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
