"""Which parameters a memory saver acts on, chosen by name.

GaLore projects 2-D weight matrices. Selecting by name (not by ``isinstance(m, nn.Linear)``)
is what reaches open_clip's ``nn.MultiheadAttention.in_proj_weight`` (a raw Parameter) and
the CLIP projections (``text_projection``, ``visual.proj``). Left out by default, because they
are not dense linear maps whose gradients are low rank in the useful sense, or because
they are tiny: patch embeddings (4-D anyway), biases and norms (1-D anyway), token and
position embeddings, class tokens and the CLIP temperature.

MeZO's weight-decay rule (no decay on biases and norms) also lives here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from vleff.checks import check_patterns
from vleff.methods.galore.config import DEFAULT_EXCLUDE, GaLoreConfig
from vleff.optim import NO_DECAY_PATTERNS, wants_decay  # noqa: F401 (re-exported)

__all__ = [
    "DEFAULT_EXCLUDE",
    "NO_DECAY_PATTERNS",
    "check_patterns",
    "galore_param_groups",
    "select_galore_params",
    "wants_decay",
]


def _compile(patterns: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    return [re.compile(pat) for pat in check_patterns(what, patterns)]


def select_galore_params(
    named_params: Iterable[tuple[str, torch.Tensor]] | nn.Module,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the trainable 2-D parameters GaLore should project.

    Args:
        named_params: a module or ``(name, parameter)`` pairs.
        targets: regular expressions (``re.search``); a parameter must match one. ``None``
            means every trainable 2-D parameter.
        exclude: regular expressions that remove a parameter even if it matches ``targets``
            (default :data:`DEFAULT_EXCLUDE`; pass ``()`` to project embeddings too).

    Raises:
        ValueError: when nothing matches (naming the patterns and a few 2-D candidates),
            because a GaLore run that projects nothing is plain AdamW by mistake.
    """
    pairs = list(named_params.named_parameters() if isinstance(named_params, nn.Module) else named_params)
    target_res = _compile(targets, "targets")
    exclude_res = _compile(exclude, "exclude")
    chosen = []
    for name, p in pairs:
        if p.ndim != 2 or not p.requires_grad:
            continue
        if target_res and not any(r.search(name) for r in target_res):
            continue
        if any(r.search(name) for r in exclude_res):
            continue
        chosen.append(name)
    if not chosen:
        candidates = [n for n, p in pairs if p.ndim == 2][:6]
        raise ValueError(
            f"GaLore matched no parameter: targets={targets!r}, exclude={exclude!r}. Only trainable 2-D "
            f"parameters can be projected; some 2-D parameter names here: {candidates or 'none'}"
        )
    return chosen


def galore_param_groups(
    model: nn.Module,
    *,
    rank: int = GaLoreConfig.rank,
    update_proj_gap: int = GaLoreConfig.update_proj_gap,
    scale: float = GaLoreConfig.scale,
    proj_type: str = GaLoreConfig.proj_type,
    targets: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
    weight_decay: float | None = None,
    svd: str | None = None,
) -> list[dict]:
    """Two param groups for :class:`~vleff.memory.GaLoreAdamW`: projected weights and the rest.

    ``weight_decay`` (when given) is set on the projected group and on the rest alike; pass
    your own groups to the optimizer for anything finer. ``svd`` (when given) picks how the
    projected group's projections are refreshed (``"full"`` or ``"lowrank"``).
    """
    names = set(select_galore_params(model, targets, exclude))
    low_rank, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (low_rank if name in names else rest).append(p)
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    svd_key = {} if svd is None else {"svd": svd}
    groups = [
        dict(
            params=low_rank,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            **svd_key,
            **extra,
        )
    ]
    if rest:
        groups.append(dict(params=rest, rank=None, **extra))
    return groups
