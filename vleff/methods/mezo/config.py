"""MeZO's settings: one validated dataclass shared by the callback, the mixin and the CLIs.

MeZO replaces the training step rather than the model's forward, so it has no
``apply``/``remove`` on models; the config is the one owner of its defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vleff.checks import check_bool, check_number, check_patterns
from vleff.registry import MethodConfig


@dataclass
class MeZOConfig(MethodConfig):
    """MeZO's settings (see :class:`vleff.callbacks.MeZO`)."""

    method = "mezo"
    eps: float = 1e-3
    lr: float | None = None
    weight_decay: float | None = None
    params: str | Sequence[str] | None = None
    seed: int = 0
    #: accept bf16/fp16 trainable weights (refused by default: rounding swamps MeZO's update)
    allow_low_precision: bool = False

    def __post_init__(self) -> None:
        check_number("eps", self.eps, low=0, low_open=True, owner="MeZO")
        check_bool("allow_low_precision", self.allow_low_precision)
        if self.lr is not None:
            check_number("lr", self.lr, low=0, owner="MeZO")
        if self.weight_decay is not None:
            check_number("weight_decay", self.weight_decay, low=0, owner="MeZO")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(
                f"MeZO: seed={seed!r} is not allowed; it must be an int in [0, 2**62) "
                "(step t draws its direction from seed + t)"
            )
        check_patterns("params", self.params)
        self.params = list(self.params) if isinstance(self.params, (list, tuple)) else self.params
