"""Schedules for ToMe's r, shared by the Lightning callback and the mixin.

A schedule is plain data (no Lightning), so it can be saved in checkpoints and tested alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vleff.methods.tome.core import update_tome_per_tower
from vleff.tokens.merging import RSpec, check_r, plain_r, r_per_block

SCHEDULES = ("constant", "linear")


@dataclass
class RSchedule:
    """r per block as a function of the optimizer step.

    * ``constant``: the full r from the first step.
    * ``linear``: every block's r grows linearly from 0 to its full value over
      ``warmup_steps`` optimizer steps (a gentle start when training with ToMe from scratch).
    """

    r: RSpec = 16
    schedule: str = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        self.r = plain_r(self.r)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not allowed; use one of {SCHEDULES}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        if self.schedule == "linear" and self.warmup_steps == 0:
            raise ValueError("schedule='linear' needs warmup_steps > 0")
        self.r = check_r(self.r)  # the errors of ToMeConfig, from the one validator

    def progress_at(self, step: int) -> float:
        """The fraction of the full r that runs at optimizer step ``step`` (one value for every
        tower: each scales its own per-block r by it)."""
        if self.schedule == "constant" or step >= self.warmup_steps:
            return 1.0
        return step / self.warmup_steps

    def r_at(self, step: int, depth: int) -> list[int]:
        """r per block at optimizer step ``step`` for a tower of ``depth`` blocks."""
        progress = self.progress_at(step)
        return [round(r * progress) for r in r_per_block(self.r, depth)]

    def apply_at(self, model: Any, step: int) -> list[list[int]]:
        """Run every ToMe tower of ``model`` at its r for ``step``, each from its own depth
        (towers of different depths get their own per-block r); returns them, tower by tower."""
        return update_tome_per_tower(model, lambda depth: self.r_at(step, depth))

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        if isinstance(state["r"], tuple):
            state["r"] = list(state["r"]) + ["__tuple__"]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RSchedule:
        r = state["r"]
        if isinstance(r, list) and r and r[-1] == "__tuple__":
            r = tuple(r[:-1])
        return cls(r=r, schedule=state["schedule"], warmup_steps=state["warmup_steps"])
