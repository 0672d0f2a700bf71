"""Example LightningModules and the model factory.

* :func:`build_model` / :data:`MODELS` — timm ViT/DeiT, open_clip and HF CLIP/BLIP towers by name;
  :func:`build_pair_model` — the whole CLIP / BLIP image-text model of a name
* :class:`ImageClassifier` — classification with any image model
* :class:`CLIPFineTuner` — contrastive image-text fine-tuning of open_clip / HF CLIP
* :class:`BLIPMatcher` — BLIP image-text matching (its ITM head), for methods on BLIP's text encoder
* :class:`VisionLanguageModel` — an image tower + a causal LM, visual prefix tokens or MemVP memory
"""

from __future__ import annotations

from vleff._lazy import lazy_getattr

_LAZY = {
    "MODELS": "vleff.models.factory",
    "ModelSpec": "vleff.models.factory",
    "TowerClassifier": "vleff.models.factory",
    "build_model": "vleff.models.factory",
    "build_pair_model": "vleff.models.factory",
    "ImageClassifier": "vleff.models.classifier",
    "CLIPFineTuner": "vleff.models.clip_finetuner",
    "build_clip": "vleff.models.clip_finetuner",
    "VisionLanguageModel": "vleff.models.vlm",
    "VisualEncoder": "vleff.models.vlm",
    "VisionLanguageTask": "vleff.models.vlm_task",
    "BLIPMatcher": "vleff.models.blip_matcher",
    "build_blip_matcher": "vleff.models.blip_matcher",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 -- a list, built from the table above


__getattr__ = lazy_getattr("vleff.models", _LAZY)
