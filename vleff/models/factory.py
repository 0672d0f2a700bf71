"""Models by short name: timm ViT/DeiT, open_clip and Hugging Face CLIP/BLIP image towers.

``build_model("vit_base")`` gives a random-init model (no download); ``pretrained=True``
loads the published weights through the owning library (timm's hub, open_clip's
``"openai"`` tag, Hugging Face's hub) — that needs network access the first time.

* With ``num_classes`` the result is a classifier: a timm model with its own head, or a CLIP/BLIP
  image tower under a :class:`TowerClassifier` (pooled features -> linear head).
* Without it, CLIP/BLIP names give the bare image tower (what ``vleff-bench`` measures and
  token methods patch) and timm names give the model with its default 1000-class head.
* :func:`build_pair_model` gives the whole image-text model of a CLIP/BLIP name (open_clip
  ``CLIP``, ``CLIPModel``, ``BlipForImageTextRetrieval``): what the cross-modal methods need.

Any timm model name that is not an alias is passed to ``timm.create_model`` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "BLIP_RANDOM_INIT_STD",
    "MODELS",
    "ModelSpec",
    "PAIR_FAMILIES",
    "TowerClassifier",
    "build_model",
    "build_pair_model",
    "patch_size_of",
]

#: weight std of a random-init BLIP vision tower (``BlipVisionConfig``'s default, 1e-10, is degenerate)
BLIP_RANDOM_INIT_STD = 0.02


@dataclass(frozen=True)
class ModelSpec:
    """Where a short model name comes from and what it defaults to."""

    family: str  # "timm" | "open_clip" | "hf_clip" | "hf_blip"
    source: str  # timm name, open_clip architecture, or Hugging Face hub id
    patch_size: int
    image_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "vit_tiny_digits": ModelSpec(
        "timm",
        "vit_tiny_patch16_224",
        4,
        32,
        dict(embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0, num_classes=10),
        "6-block, 128-wide ViT for 32x32 digits (trains in ~1 min on 2 CPU cores)",
    ),
    "vit_small": ModelSpec("timm", "vit_small_patch16_224", 16, 224, description="ViT-S/16"),
    "vit_base": ModelSpec("timm", "vit_base_patch16_224", 16, 224, description="ViT-B/16"),
    "vit_large": ModelSpec("timm", "vit_large_patch16_224", 16, 224, description="ViT-L/16"),
    "deit_small": ModelSpec("timm", "deit_small_patch16_224", 16, 224, description="DeiT-S/16"),
    "deit_small_distilled": ModelSpec(
        "timm", "deit_small_distilled_patch16_224", 16, 224, description="DeiT-S/16 with distillation token"
    ),
    "open_clip_vit_b32": ModelSpec("open_clip", "ViT-B-32", 32, 224, description="open_clip ViT-B-32 image tower"),
    "open_clip_vit_b16": ModelSpec("open_clip", "ViT-B-16", 16, 224, description="open_clip ViT-B-16 image tower"),
    "open_clip_vit_l14": ModelSpec("open_clip", "ViT-L-14", 14, 224, description="open_clip ViT-L-14 image tower"),
    "hf_clip_vit_b32": ModelSpec(
        "hf_clip", "openai/clip-vit-base-patch32", 32, 224, description="Hugging Face CLIP ViT-B/32 image tower"
    ),
    "hf_blip_base": ModelSpec(
        "hf_blip",
        "Salesforce/blip-itm-base-coco",
        16,
        384,
        description="Hugging Face BLIP ViT-B/16 image tower (384 px)",
    ),
}


#: families whose names have a whole image-text model (:func:`build_pair_model`)
PAIR_FAMILIES = ("open_clip", "hf_clip", "hf_blip")


def build_pair_model(name: str, image_size: int | None = None, pretrained: bool = False) -> nn.Module:
    """The whole image-text model of a CLIP/BLIP alias, random init unless ``pretrained``.

    ``open_clip_vit_b32`` -> ``open_clip.CLIP``; ``hf_clip_vit_b32`` -> ``transformers.CLIPModel``;
    ``hf_blip_base`` -> ``transformers.BlipForImageTextRetrieval`` (random init: vision weights
    with std :data:`BLIP_RANDOM_INIT_STD`, as :func:`build_model`). The spec's ``kwargs`` are not
    used: they configure the bare tower.
    """
    spec = MODELS.get(name) if isinstance(name, str) else None
    if spec is None or spec.family not in PAIR_FAMILIES:
        pairs = [n for n, s in MODELS.items() if s.family in PAIR_FAMILIES]
        raise ValueError(
            f"model {name!r} has no image-text model (a method needing both towers of one): "
            f"use one of {', '.join(pairs)}"
        )
    size = image_size or spec.image_size
    _check_image_size(name, size, spec.patch_size)
    if spec.family == "open_clip":
        import open_clip

        return open_clip.create_model(spec.source, pretrained="openai" if pretrained else None, force_image_size=size)
    if spec.family == "hf_clip":
        from transformers import CLIPConfig, CLIPModel

        if pretrained:
            return CLIPModel.from_pretrained(spec.source)
        return CLIPModel(CLIPConfig(vision_config={"image_size": size, "patch_size": spec.patch_size}))
    from transformers import BlipConfig, BlipForImageTextRetrieval

    if pretrained:
        return BlipForImageTextRetrieval.from_pretrained(spec.source)
    return BlipForImageTextRetrieval(
        BlipConfig(
            vision_config={"image_size": size, "patch_size": spec.patch_size, "initializer_range": BLIP_RANDOM_INIT_STD}
        )
    )


class TowerClassifier(nn.Module):
    """A CLIP/BLIP image tower with a linear head on its pooled features."""

    def __init__(self, tower: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.tower(images)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, tuple):  # open_clip towers may return (pooled, tokens)
            return out[0]
        return out.pooler_output  # transformers ModelOutput

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _check_image_size(name: str, image_size: int, patch_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0 or image_size % patch_size:
        raise ValueError(
            f"image_size={image_size!r} is not a positive multiple of the patch size {patch_size} of model {name!r}"
        )


def patch_size_of(name: str) -> int:
    """The patch size of a model name (an alias or a timm name)."""
    if name in MODELS:
        return MODELS[name].patch_size
    import timm

    if not timm.is_model(name):
        raise _unknown(name)
    return timm.create_model(name, pretrained=False).patch_embed.patch_size[0]


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not known: use one of {sorted(MODELS)}, or a timm model name (see timm.list_models())"
    )


def _timm(
    name: str,
    spec: ModelSpec | None,
    num_classes: int | None,
    image_size: int | None,
    pretrained: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    import timm

    if pretrained and spec is not None and spec.kwargs:
        raise ValueError(f"model {name!r} has no published weights (it is a custom size); use pretrained=False")
    source = spec.source if spec else name
    if spec is None and not timm.is_model(source):
        raise _unknown(name)
    args = dict(spec.kwargs if spec else {}) | kwargs
    if num_classes is not None:
        args["num_classes"] = num_classes
    if image_size is not None:
        args["img_size"] = image_size
    if spec is not None:
        args.setdefault("img_size", spec.image_size)
        args.setdefault("patch_size", spec.patch_size)
    return timm.create_model(source, pretrained=pretrained, **args)


def _pair(size: Any) -> int | None:
    if isinstance(size, (tuple, list)):
        size = size[0] if size else None
    return int(size) if isinstance(size, int) and size > 0 else None


def image_input_size(model: nn.Module) -> tuple[int, int] | None:
    """``(channels, side)`` of the square images ``model`` takes natively, or ``None``.

    Reads timm's ``patch_embed``, open_clip's ``visual.image_size``, Hugging Face vision
    configs and :class:`TowerClassifier` towers; used to build ``example_input_array`` so
    Lightning's model summary can count FLOPs.
    """
    for candidate in (model, getattr(model, "tower", None), getattr(model, "visual", None)):
        if candidate is None:
            continue
        embed = getattr(candidate, "patch_embed", None)
        if embed is not None and _pair(getattr(embed, "img_size", None)):
            proj = getattr(embed, "proj", None)
            channels = getattr(proj, "in_channels", 3) if proj is not None else 3
            return int(channels), _pair(embed.img_size)  # type: ignore[return-value]
        if _pair(getattr(candidate, "image_size", None)):
            return 3, _pair(candidate.image_size)  # type: ignore[return-value]
        config = getattr(candidate, "config", None)
        config = getattr(config, "vision_config", config)
        if config is not None and _pair(getattr(config, "image_size", None)):
            return int(getattr(config, "num_channels", 3)), _pair(config.image_size)  # type: ignore[return-value]
    return None


def offline_reason(timeout: float = 3.0) -> str | None:
    """Why pretrained weights cannot be downloaded now, or ``None`` when the hub is reachable.

    ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set to a true value answer at once; otherwise
    one TCP connection to the hub's host (``HF_ENDPOINT``, default huggingface.co) is tried
    for at most ``timeout`` seconds, instead of letting the download retry for minutes.
    """
    import os
    import socket
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {host}:{port} ({err.__class__.__name__}: {err})"


def use_offline_hub() -> None:
    """Make the Hugging Face hub (timm, open_clip and transformers download through it) use
    only its local cache in this process, so a missing file fails at once instead of after
    connection retries."""
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on it
        return
    constants.HF_HUB_OFFLINE = True  # read once at import; the variable alone is too late here


def build_model(
    name: str, num_classes: int | None = None, image_size: int | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """Build a model by alias (see :data:`MODELS`) or timm name; see the module docstring."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive int")
    spec = MODELS.get(name)
    if image_size is not None:
        _check_image_size(name, image_size, spec.patch_size if spec else patch_size_of(name))
    if spec is None or spec.family == "timm":
        return _timm(name, spec, num_classes, image_size, pretrained, kwargs)
    size = image_size or spec.image_size
    if spec.family == "open_clip":
        import open_clip

        clip = open_clip.create_model(
            spec.source, pretrained="openai" if pretrained else None, force_image_size=size, **kwargs
        )
        tower, dim = clip.visual, clip.visual.output_dim
    elif spec.family == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if pretrained:
            tower = CLIPVisionModel.from_pretrained(spec.source, **kwargs)
        else:
            tower = CLIPVisionModel(CLIPVisionConfig(image_size=size, patch_size=spec.patch_size, **kwargs))
        dim = tower.config.hidden_size
    elif spec.family == "hf_blip":
        from transformers import (
            BlipForImageTextRetrieval,
            BlipVisionConfig,
            BlipVisionModel,
        )

        if pretrained:
            tower = BlipForImageTextRetrieval.from_pretrained(spec.source, **kwargs).vision_model
        else:
            # BLIP's vision config initialises with std 1e-10 (its weights are meant to be loaded):
            # a random-init tower would be near zero, its attention uniform and its token scores
            # meaningless. 0.02 is BLIP's own text-config value and ViT's.
            settings = {"initializer_range": BLIP_RANDOM_INIT_STD, **kwargs}
            tower = BlipVisionModel(BlipVisionConfig(image_size=size, patch_size=spec.patch_size, **settings))
        dim = tower.config.hidden_size
    else:  # pragma: no cover - MODELS is closed
        raise _unknown(name)
    return TowerClassifier(tower, dim, num_classes) if num_classes is not None else tower
