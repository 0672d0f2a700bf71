"""UniPT (Diao et al., CVPR 2024): universal parallel tuning beside a frozen tower.

The backbone runs frozen; the side module reads, detached, the embeddings and every block's
output ``H = [h_0 … h_L]`` (:class:`vleff.side.common.LayerReader`) and the tower's frozen final
feature ``a`` (its final norm's output at the pooled row: cls for image towers, EOT for text
towers). With ``m = C / factor``:

* per layer ``T_i = Lin_i(relu(h_i))`` (``[B, N, m]``), anchor ``A = Lin_a(relu(a))`` (``[B, m]``);
* **parallel interaction**: ``w_i = l1norm(relu(A · T_iᵀ))`` over the real tokens (a text tower's
  padding masked out), ``M_i = w_i · T_i + T_i[pooled row]``;
* **confidence aggregation**: ``c_i = Linear(A ⊙ mean(T_i))``, ``softmax`` over the layers;
* output ``a + Up(relu(Σ_i softmax(c)_i · M_i))``, added at the pooled row of the final norm's
  output, so the library's pooling, projection and head follow unchanged.

**Deliberate change from the reference:** ``Up`` is zero-initialised, so the model starts
*exactly* at the frozen model (for CLIP: its zero-shot behaviour) and the side network grows
from there; the reference initialises ``Up`` randomly and starts elsewhere.

Where the anchor lives: the paper's ``a`` is the projected embedding (image cls·proj, text
EOT·proj); vleff's is the same feature *before* the projection (the final norm's pooled row).
The projection is linear and frozen, so ``proj(a + Up(..))`` is ``proj(a) + proj(Up(..))``:
the same function class, and one insertion point for every family (timm heads included).

>>> vleff.apply_unipt(model, factor=2)       # every supported tower (towers="all")
>>> vleff.side.freeze_backbone(model, train_head=False)  # apply froze the backbone; this the head too
>>> vleff.remove_unipt(model)               # the original model, exactly
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones import TowerAdapter, find_towers
from vleff.checks import check_int, check_towers
from vleff.registry import MethodConfig, refuse_applied_conflicts
from vleff.side.common import (
    SideModule,
    attach_side,
    detach_side,
    final_norm,
    freeze_on_apply,
    restore_on_remove,
    side_modules,
)
from vleff.tokens.common import hooks_named, select_towers

HOOK_NAME = "unipt"
MODULE_NAME = "vleff_unipt"
TOWERS = ("image", "text")


@dataclass
class UniPTConfig(MethodConfig):
    """UniPT's settings.

    Attributes:
        factor: the side width is ``m = C / factor`` (the paper: 2; CLIP4Clip 1). Must divide
            the tower width.
        towers: ``"image"``, ``"text"`` or ``"all"``.
    """

    method = "unipt"
    factor: int = 2
    towers: str = "all"

    def __post_init__(self) -> None:
        self.factor = check_int("factor", self.factor, low=1)
        check_towers(self.towers, TOWERS)


class UniPTModule(SideModule):
    """The trained parts for one tower: ``L + 1`` layer projections, the anchor projection, the
    confidence head and the zero-initialised ``Up``."""

    def __init__(self, num_layers: int, width: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, hidden) for _ in range(num_layers))
        self.anchor = nn.Linear(width, hidden)
        self.confidence = nn.Linear(hidden, 1)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)  # zero: the model starts exactly at the frozen model
        nn.init.zeros_(self.up.bias)

    def correction(
        self, layers: list[torch.Tensor], anchor: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        if len(layers) != len(self.layers):
            raise RuntimeError(f"unipt: read {len(layers)} layer outputs, the module has {len(self.layers)} layers")
        dtype = self.anchor.weight.dtype
        a = self.anchor(F.relu(anchor.to(dtype)))  # [B, m]
        mask = mask.to(a.dtype)
        count = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        batch = torch.arange(a.shape[0], device=a.device)
        mixed, scores = [], []
        for lin, h in zip(self.layers, layers):
            t = lin(F.relu(h.to(dtype)))  # [B, N, m]
            sim = F.relu(torch.einsum("bm,bnm->bn", a, t)) * mask
            w = sim / sim.sum(dim=1, keepdim=True).clamp_min(1e-6)  # l1-normalised over the real tokens
            mixed.append(torch.einsum("bn,bnm->bm", w, t) + t[batch, rows])
            mean = torch.einsum("bn,bnm->bm", mask, t) / count
            scores.append(self.confidence(a * mean))  # [B, 1]
        weights = torch.cat(scores, dim=1).softmax(dim=1)  # [B, L + 1]
        agg = torch.einsum("bl,blm->bm", weights, torch.stack(mixed, dim=1))
        return self.up(F.relu(agg))


def unipt_num_parameters(depth: int, width: int, factor: int) -> int:
    """Parameters UniPT adds to one tower of ``depth`` blocks and width ``C`` (``m = C / factor``)."""
    m = width // factor
    return (depth + 1) * (width * m + m) + (width * m + m) + (m + 1) + (m * width + width)


def _check_tower(tower: TowerAdapter, cfg: UniPTConfig) -> int:
    final_norm(tower)  # TypeError for unsupported families / pooling
    width = tower.embed_dim
    if width % cfg.factor:
        divisors = [d for d in range(1, min(width, 16) + 1) if width % d == 0]
        raise ValueError(
            f"factor={cfg.factor} does not divide the width {width} of {tower.describe()}; "
            f"use a divisor of {width} (e.g. {divisors})"
        )
    return width // cfg.factor


def apply_unipt(model: nn.Module, config: UniPTConfig | None = None, **settings: Any) -> nn.Module:
    """Add a UniPT side module to every tower ``towers`` names (in place). Applying again
    replaces it (drawn anew). Freezes the backbone
    (:func:`vleff.side.common.backbone_modules`; a timm head stays trainable); ``remove_*`` restores the flags.

    Raises:
        TypeError: no supported tower (timm cls-pooled ViT, open_clip and Hugging Face CLIP towers).
        ValueError: ``factor`` does not divide a tower's width; a token method is applied.
    """
    cfg = UniPTConfig.build(config, **settings)
    towers = select_towers(model, cfg.towers)
    hidden = {id(t.root): _check_tower(t, cfg) for t in towers}  # every tower checked before any change
    if unipt_applied(model):
        remove_unipt(model)
    refuse_applied_conflicts(model, HOOK_NAME)
    for tower in towers:
        module = UniPTModule(len(tower.blocks()) + 1, tower.embed_dim, hidden[id(tower.root)])
        attach_side(tower, HOOK_NAME, MODULE_NAME, module)
    freeze_on_apply(model)  # the backbone frozen, as apply_lora does (remove_* restores the flags)
    return model


def remove_unipt(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_unipt`: no hooks, no ``vleff_unipt`` modules, the library's forward."""
    detach_side(model, HOOK_NAME, MODULE_NAME)
    restore_on_remove(model)
    return model


def unipt_applied(model: nn.Module) -> bool:
    return bool(hooks_named(model, HOOK_NAME))


def unipt_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in side_modules(model) if isinstance(m, UniPTModule) for p in m.parameters()]


def unipt_settings(model: nn.Module) -> dict[str, Any]:
    """UniPT's settings as applied to ``model``, read back from its side networks."""
    towers = [t for t in find_towers(model) if isinstance(t.root._modules.get(MODULE_NAME), UniPTModule)]
    if not towers:
        return {}
    side: Any = towers[0].root._modules[MODULE_NAME]
    return {
        "towers": frozenset(t.modality for t in towers),
        "factor": towers[0].embed_dim // side.layers[0].out_features,
    }
