"""Registry entries of the memory savers that act on the optimizer and the training step.

GaLore (low-rank gradient projection) and MeZO (zeroth-order steps) do not change a model's
forward: they have no ``apply``/``remove`` on models; their configs validate the settings the
callbacks, mixins and CLIs share, and their entries name the callback and mixin.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vleff.checks import check_bool, check_number
from vleff.memory.galore import DEFAULT_SVD, PROJ_TYPES, SVD_METHODS
from vleff.memory.selection import DEFAULT_EXCLUDE, check_patterns
from vleff.registry import Method, MethodConfig, register_method


@dataclass
class GaLoreConfig(MethodConfig):
    """GaLore's settings (see :class:`vleff.callbacks.GaLore`)."""

    method = "galore"
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    targets: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE
    svd: str = DEFAULT_SVD

    def __post_init__(self) -> None:
        rank, gap, scale = self.rank, self.update_proj_gap, self.scale
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"GaLore: rank={rank!r} is not allowed; use a positive int (the rank of the "
                             "projected moments)")
        if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
            raise ValueError(f"GaLore: update_proj_gap={gap!r} is not allowed; use a positive int "
                             "(steps between projection refreshes)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"GaLore: scale={scale!r} is not allowed; it must be a finite number > 0 "
                             "(alpha, the factor on the back-projected update; the paper uses 0.25)")
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={self.proj_type!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"GaLore: svd={self.svd!r} is not allowed; use one of {', '.join(SVD_METHODS)}")
        check_patterns("targets", self.targets)
        check_patterns("exclude", self.exclude)
        self.targets = list(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        self.exclude = list(self.exclude) if isinstance(self.exclude, (list, tuple)) else self.exclude


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
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 62:
            raise ValueError(f"MeZO: seed={seed!r} is not allowed; it must be an int in [0, 2**62) "
                             "(step t draws its direction from seed + t)")
        check_patterns("params", self.params)
        self.params = list(self.params) if isinstance(self.params, (list, tuple)) else self.params


register_method(Method(
    name="galore", kind="memory", config=GaLoreConfig, apply=None, remove=None, callback="vleff.callbacks.GaLore",
    mixin="vleff.callbacks.GaLoreMixin", towers=(), bench_settings={"rank": 128},
    description="GaLore: Adam moments in a low-rank projection of each 2-D gradient"))
register_method(Method(
    name="mezo", kind="memory", config=MeZOConfig, apply=None, remove=None, callback="vleff.callbacks.MeZO",
    mixin="vleff.callbacks.MeZOMixin", towers=(), bench_settings={"eps": 1e-3},
    description="MeZO: zeroth-order SPSA steps, forward passes only"))
