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

import sys
from typing import Iterator

from torch import nn

from vleff.backbones.base import AttentionConfig, BlockParts, CrossInputs, Layout, Modality, TowerAdapter  # noqa: F401
from vleff.backbones.patch import TowerPatch, get_patch, patch_tower, unpatch_tower
from vleff.backbones.hooks import BlockInfo, StaleBlockInfo, TowerHook
from vleff.backbones.state import TokenField, TokenState

# (library module that must be imported for the model to be of that family, adapter path)
_REGISTRY: list[tuple[str, str, str]] = [
    ("timm", "vleff.backbones.timm_vit", "TimmViTAdapter"),
    ("open_clip", "vleff.backbones.open_clip", "OpenClipVisionAdapter"),
    ("open_clip", "vleff.backbones.open_clip", "OpenClipTextAdapter"),
    ("transformers", "vleff.backbones.hf", "HFCLIPAdapter"),
    ("transformers", "vleff.backbones.hf", "HFBlipVisionAdapter"),
    ("transformers", "vleff.backbones.blip_text", "HFBlipTextAdapter"),
]

SUPPORTED = (
    "timm VisionTransformer (ViT/DeiT)",
    "open_clip CLIP / CustomTextCLIP (image and text towers)",
    "transformers CLIPModel / CLIPVisionModel / CLIPTextModel (+WithProjection)",
    "transformers BLIP models (vision tower: BlipVisionModel)",
    "transformers BLIP text encoder / decoder (BlipTextModel, also inside BlipTextLMHeadModel)",
)


def find_pair(model: nn.Module):
    """The image-text :class:`~vleff.backbones.pairs.ModelPair` of ``model`` (see :mod:`vleff.backbones.pairs`)."""
    from vleff.backbones.pairs import find_pair as _find_pair

    return _find_pair(model)


def _adapter_classes() -> Iterator[type[TowerAdapter]]:
    import importlib

    for library, module_name, class_name in _REGISTRY:
        if library in sys.modules:  # a model of that family implies its library is imported
            yield getattr(importlib.import_module(module_name), class_name)


def _match(module: nn.Module) -> list[TowerAdapter]:
    found = []
    for cls in _adapter_classes():
        if cls.matches(module):
            found.append(cls(module))
    return found


def find_towers(model: nn.Module, modality: Modality | None = None) -> list[TowerAdapter]:
    """All supported towers inside ``model`` (the model itself included), outermost first.

    A matched tower's descendants are not searched (an open_clip ``CLIP`` is the text tower
    *and* holds the image tower as ``.visual``, which is searched separately).

    Raises:
        TypeError: no supported tower (of the requested modality) is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    towers: list[TowerAdapter] = []
    claimed: set[int] = set()

    def visit(module: nn.Module) -> None:
        matched = _match(module)
        towers.extend(matched)
        block_ids = {id(b) for t in matched for b in t.blocks()}
        claimed.update(block_ids)
        for child in module.children():
            if id(child) in claimed or (matched and _is_block_container(child, matched)):
                continue
            visit(child)

    visit(model)
    if modality is not None:
        towers = [t for t in towers if t.modality == modality]
    if not towers:
        what = f"{modality} tower" if modality else "transformer tower"
        raise TypeError(
            f"no supported {what} found in {type(model).__module__}.{type(model).__name__}; "
            f"vleff supports: {'; '.join(SUPPORTED)}")
    return towers


def _is_block_container(child: nn.Module, towers: list[TowerAdapter]) -> bool:
    blocks = {id(b) for t in towers for b in t.blocks()}
    kids = list(child.children())
    return bool(kids) and all(id(k) in blocks for k in kids)


def find_tower(model: nn.Module, modality: Modality = "image") -> TowerAdapter:
    """The single tower of ``modality`` in ``model``; errors if there are none or several."""
    towers = find_towers(model, modality)
    if len(towers) > 1:
        names = ", ".join(t.describe() for t in towers)
        raise ValueError(f"{type(model).__name__} holds {len(towers)} {modality} towers ({names}); pass one of them")
    return towers[0]


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
                patch.state.token_counts)
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
