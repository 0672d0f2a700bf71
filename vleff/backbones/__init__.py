"""Backbone adapters: find the transformer towers inside any supported model.

>>> towers = find_towers(model)                 # every image/text tower, outermost first
>>> tower = find_tower(model, modality="image")  # exactly one, or a clear error

Supported families (the adapters never change weights or parameter names):

* timm ``VisionTransformer`` (ViT, DeiT, distilled DeiT, register tokens)
* open_clip ``CLIP``/``CustomTextCLIP``: image ``VisionTransformer`` and text tower
* Hugging Face ``CLIPVisionModel``/``CLIPTextModel`` (also inside ``CLIPModel``)
* Hugging Face ``BlipVisionModel`` (inside every BLIP model)
* Hugging Face ``BlipTextModel``: BLIP's text encoder and the ``bert`` of its text decoder
  (post-norm layers with image cross-attention, layout ``"post_norm_cross"``)
"""

from __future__ import annotations

from torch import nn

from vleff.backbones.base import (  # noqa: F401
    AttentionConfig,
    BlockParts,
    CrossAttentionParts,
    CrossInputs,
    Layout,
    Modality,
    TowerAdapter,
)
from vleff.backbones.hooks import BlockInfo, StaleBlockInfo, TowerHook
from vleff.backbones.patch import TowerPatch, get_patch, patch_tower, unpatch_tower
from vleff.backbones.state import TokenField, TokenState
from vleff.backbones.towers import SUPPORTED, find_tower, find_towers  # noqa: E402


def find_pair(model: nn.Module):
    """The image-text :class:`~vleff.backbones.pairs.ModelPair` of ``model`` (see :mod:`vleff.backbones.pairs`)."""
    from vleff.backbones.pairs import find_pair as _find_pair

    return _find_pair(model)


def last_token_state(model: nn.Module, modality: Modality = "image") -> TokenState | None:
    """The token state of the latest forward of ``model``'s patched ``modality`` tower."""
    for tower in find_towers(model, modality):
        patch = get_patch(tower.root)
        if patch is not None and patch.state is not None:
            return patch.state
    return None


def token_counts(model: nn.Module) -> dict[str, list[int]]:
    """Tokens entering each block in the latest forward, per patched tower (empty if none)."""
    counts: dict[str, list[int]] = {}
    try:
        towers = find_towers(model)
    except TypeError:
        return counts
    for tower in towers:
        patch = get_patch(tower.root)
        if patch is not None and patch.state is not None and patch.hooks:
            counts[tower.modality if tower.modality not in counts else f"{tower.modality}_{len(counts)}"] = list(
                patch.state.token_counts
            )
    return counts


__all__ = [
    "AttentionConfig",
    "Modality",
    "BlockInfo",
    "BlockParts",
    "CrossInputs",
    "Layout",
    "SUPPORTED",
    "StaleBlockInfo",
    "TokenField",
    "TokenState",
    "TowerHook",
    "TowerAdapter",
    "TowerPatch",
    "find_pair",
    "find_tower",
    "find_towers",
    "get_patch",
    "last_token_state",
    "patch_tower",
    "token_counts",
    "unpatch_tower",
]
