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
    """MeZO's settings (see :class:`vleff.callbacks.MeZO`).

    Attributes:
        eps: perturbation size ε (> 0).
        lr: step size for every group; ``None`` keeps the lr of the optimizer
            ``configure_optimizers`` returns (required when it returns none). MeZO's
            full-parameter runs use 1e-6 to 1e-7.
        weight_decay: overrides the groups' weight decay; biases and norms never decay.
        params: regular expressions on parameter names to train a subset (default: every
            parameter of the optimizer). Parameters with ``requires_grad=False`` are never
            perturbed or updated.
        seed: base seed for the perturbations (step ``t`` uses ``seed + t``), an int >= 0.
        allow_low_precision: accept bf16/fp16 trainable weights (refused by default: their
            rounding swamps MeZO's update of size ``lr · g · z``).
    """

    method = "mezo"
    eps: float = 1e-3
    lr: float | None = None
    weight_decay: float | None = None
    params: str | Sequence[str] | None = None
    seed: int = 0
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
