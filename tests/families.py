"""The one table of model families the tests run on: tiny random-init configs of the real
library classes, and how to run each tower (image, text) of each.

A family row names its towers; a tower forward takes the model and returns a tensor whose
value depends on every token of that tower (a pooled embedding or the logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import tiny_models as tm

Forward = Callable[[torch.nn.Module], torch.Tensor]


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], torch.nn.Module]
    forwards: dict[str, Forward]  # tower modality -> forward
    grad_checkpointing: Callable[[torch.nn.Module], None] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


def _hf_gc(model: torch.nn.Module) -> None:
    model.gradient_checkpointing_enable()


def _image(x_fn=tm.images):
    return x_fn


def _blip_text(model: torch.nn.Module) -> torch.Tensor:
    """BLIP's text encoder as its ITM head reads it: token 0 after cross-attending to the image
    (padded captions: the padding mask must follow every reduction)."""
    ids, mask = tm.blip_token_ids()
    image = model.vision_model(pixel_values=tm.images()).last_hidden_state
    return model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state[:, 0]


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("timm_vit", lambda: tm.timm_vit(), {"image": lambda m: m(tm.images())},
           lambda m: m.set_grad_checkpointing(True), ("cls",)),
    Family("deit_distilled", lambda: tm.timm_deit_distilled(), {"image": lambda m: m(tm.images())},
           lambda m: m.set_grad_checkpointing(True), ("cls",)),
    Family("timm_registers", lambda: tm.timm_vit(reg_tokens=2), {"image": lambda m: m(tm.images())},
           lambda m: m.set_grad_checkpointing(True), ("cls",)),
    Family("open_clip", tm.open_clip_model, {
        "image": lambda m: m.encode_image(tm.images()),
        "text": lambda m: m.encode_text(tm.token_ids()),
    }, lambda m: m.set_grad_checkpointing(True), ("cls", "pair")),
    Family("hf_clip", tm.hf_clip_model, {
        "image": lambda m: m.get_image_features(pixel_values=tm.images()).pooler_output,
        "text": lambda m: m.get_text_features(input_ids=tm.token_ids()).pooler_output,
    }, _hf_gc, ("cls", "pair")),
    Family("hf_blip", tm.hf_blip_retrieval, {
        "image": lambda m: m.vision_model(pixel_values=tm.images()).pooler_output,
        "text": _blip_text,
    }, _hf_gc, ("cls",)),
]}


def family_towers(towers: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(family, tower)`` for every family tower whose modality is in ``towers``."""
    return [(f.name, t) for f in FAMILIES.values() for t in f.forwards if t in towers]
