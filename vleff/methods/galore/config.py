"""GaLore's settings: one validated dataclass shared by the callback, the mixin and the CLIs.

GaLore does not change a model's forward, so it has no ``apply``/``remove`` on models; the
config is the one owner of its defaults: the optimizer, the param-group builder, the optimizer
conversion, the callback and the mixin read them from here (``GaLoreConfig.rank`` ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vleff.checks import check_patterns
from vleff.registry import MethodConfig

PROJ_TYPES = ("std", "reverse_std", "left", "right")
#: how the projection is refreshed: thin SVD (exact) or randomized low-rank SVD (torch.svd_lowrank)
SVD_METHODS = ("full", "lowrank")
#: chosen from benchmarks/galore_svd.py on a 2-core CPU (docs/benchmarks.md, "GaLore projection refresh")
DEFAULT_SVD = "full"

#: name patterns (``re.search``) kept out of GaLore unless the caller passes ``exclude=()``
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"embed",  # token_embedding, patch_embed, embeddings.*, position_embedding
    r"positional",  # open_clip positional_embedding
    r"pos_embed",
    r"cls_token|class_embedding|dist_token|reg_token",
    r"(^|\.)(ln|norm)|layernorm|layer_norm|ln_\w*",
    r"logit_scale|logit_bias",
)


@dataclass
class GaLoreConfig(MethodConfig):
    """GaLore's settings (see :class:`vleff.callbacks.GaLore`).

    Attributes:
        rank: rank ``r`` of the projected moments (clamped to the matrix size).
        update_proj_gap: steps between SVD refreshes of the projection (``T``).
        scale: ``α`` applied to the back-projected update.
        proj_type: ``"std"``, ``"reverse_std"``, ``"left"`` or ``"right"``: which side of each 2-D
            gradient is projected.
        targets: regular expressions on parameter names (default: every trainable 2-D weight).
        exclude: names left out (default :data:`DEFAULT_EXCLUDE`: embeddings, norms, class tokens,
            the CLIP temperature).
        svd: how the projection is refreshed: ``"full"`` (thin SVD) or ``"lowrank"`` (randomized,
            :func:`torch.svd_lowrank`).
    """

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
            raise ValueError(
                f"GaLore: rank={rank!r} is not allowed; use a positive int (the rank of the projected moments)"
            )
        if isinstance(gap, bool) or not isinstance(gap, int) or gap <= 0:
            raise ValueError(
                f"GaLore: update_proj_gap={gap!r} is not allowed; use a positive int "
                "(steps between projection refreshes)"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(
                f"GaLore: scale={scale!r} is not allowed; it must be a finite number > 0 "
                "(alpha, the factor on the back-projected update; the paper uses 0.25)"
            )
        if self.proj_type not in PROJ_TYPES:
            raise ValueError(f"proj_type={self.proj_type!r} is not allowed; use one of {', '.join(PROJ_TYPES)}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"GaLore: svd={self.svd!r} is not allowed; use one of {', '.join(SVD_METHODS)}")
        check_patterns("targets", self.targets)
        check_patterns("exclude", self.exclude)
        self.targets = list(self.targets) if isinstance(self.targets, (list, tuple)) else self.targets
        self.exclude = list(self.exclude) if isinstance(self.exclude, (list, tuple)) else self.exclude
