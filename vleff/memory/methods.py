"""Registry entries of the memory savers that act on the optimizer and the training step.

GaLore (low-rank gradient projection) and MeZO (zeroth-order steps) do not change a model's
forward: they have no ``apply``/``remove`` on models; their configs validate the settings the
callbacks, mixins and CLIs share, and their entries name the callback and mixin.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vleff.checks import check_choice, check_int, check_number
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
        check_int("rank", self.rank, low=1)
        check_int("update_proj_gap", self.update_proj_gap, low=1)
        self.scale = check_number("scale", self.scale, low=0, low_open=True)
        check_choice("proj_type", self.proj_type, PROJ_TYPES)
        check_choice("svd", self.svd, SVD_METHODS)
        check_patterns("targets", self.targets)
        check_patterns("exclude", self.exclude)


@dataclass
class MeZOConfig(MethodConfig):
    """MeZO's settings (see :class:`vleff.callbacks.MeZO`)."""

    method = "mezo"
    eps: float = 1e-3
    lr: float | None = None
    weight_decay: float | None = None
    params: str | Sequence[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.eps = check_number("eps", self.eps, low=0, low_open=True)
        if self.lr is not None:
            self.lr = check_number("lr", self.lr, low=0)
        if self.weight_decay is not None:
            self.weight_decay = check_number("weight_decay", self.weight_decay, low=0)
        check_int("seed", self.seed, low=0)
        check_patterns("params", self.params)


register_method(Method(
    name="galore", kind="memory", config=GaLoreConfig, apply=None, remove=None, callback="vleff.callbacks.GaLore",
    mixin="vleff.callbacks.GaLoreMixin", towers=(), bench_settings={"rank": 128},
    description="GaLore: Adam moments in a low-rank projection of each 2-D gradient"))
register_method(Method(
    name="mezo", kind="memory", config=MeZOConfig, apply=None, remove=None, callback="vleff.callbacks.MeZO",
    mixin="vleff.callbacks.MeZOMixin", towers=(), bench_settings={"eps": 1e-3},
    description="MeZO: zeroth-order SPSA steps, forward passes only"))
