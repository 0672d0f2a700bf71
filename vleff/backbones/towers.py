"""Find the transformer towers inside a model: the family adapters' registry and the walk.

The one place that lists the families (:data:`SUPPORTED`, the adapter classes by library); a
family's adapter module is imported only when its library is (a model of that family implies it).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

from torch import nn

from vleff.backbones.base import Modality, TowerAdapter

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
            f"vleff supports: {'; '.join(SUPPORTED)}"
        )
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
