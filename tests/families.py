"""The one table of model families the tests run on: tiny random-init configs of the real
library classes, and how to run each tower (image, text) of each.

A family row names its towers; a tower forward takes the model and returns a tensor whose
value depends on every token of that tower (a pooled embedding or the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import tiny_models as tm
import torch

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


#: image forwards taking the images: ``fn(model, x)`` (method tests that choose their own batch)
IMAGE: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "timm_vit": lambda m, x: m(x),
    "deit_distilled": lambda m, x: m(x),
    "timm_registers": lambda m, x: m(x),
    "open_clip": lambda m, x: m.encode_image(x),
    "open_clip_unequal": lambda m, x: m.encode_image(x),
    "hf_clip": lambda m, x: m.get_image_features(pixel_values=x).pooler_output,
    "hf_blip": lambda m, x: m.vision_model(pixel_values=x).pooler_output,
}


def image_forwards(*names: str) -> dict[str, tuple[Callable[[], torch.nn.Module], Callable]]:
    """``{family: (make, forward(model, images))}`` for the named families (all when none named)."""
    return {n: (FAMILIES[n].make, IMAGE[n]) for n in (names or tuple(IMAGE))}


def _blip_text(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """BLIP's text encoder as its ITM head reads it: token 0 after cross-attending to the image
    (padded captions: the padding mask must follow every reduction)."""
    image = model.vision_model(pixel_values=images).last_hidden_state
    return model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state[:, 0]


#: text forwards taking their inputs: ``fn(model, *text_inputs(family))`` (what ``torch.compile``
#: and ``torch.export`` take for a method that acts on text towers only)
TEXT: dict[str, Callable[..., torch.Tensor]] = {
    "open_clip": lambda m, ids: m.encode_text(ids),
    "open_clip_unequal": lambda m, ids: m.encode_text(ids),
    "hf_clip": lambda m, ids: m.get_text_features(input_ids=ids).pooler_output,
    "hf_blip": _blip_text,
}


def text_inputs(family: str) -> tuple[torch.Tensor, ...]:
    """The inputs of ``TEXT[family]``: token ids (BLIP: ids, padding mask and the images it reads)."""
    if family == "hf_blip":
        return (*tm.blip_token_ids(), tm.images())
    return (tm.token_ids(),)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "timm_vit",
            lambda: tm.timm_vit(),
            {"image": lambda m: IMAGE["timm_vit"](m, tm.images())},
            lambda m: m.set_grad_checkpointing(True),
            ("cls",),
        ),
        Family(
            "deit_distilled",
            lambda: tm.timm_deit_distilled(),
            {"image": lambda m: IMAGE["deit_distilled"](m, tm.images())},
            lambda m: m.set_grad_checkpointing(True),
            ("cls",),
        ),
        Family(
            "timm_registers",
            lambda: tm.timm_vit(reg_tokens=2),
            {"image": lambda m: IMAGE["timm_registers"](m, tm.images())},
            lambda m: m.set_grad_checkpointing(True),
            ("cls",),
        ),
        Family(
            "open_clip",
            tm.open_clip_model,
            {
                "image": lambda m: IMAGE["open_clip"](m, tm.images()),
                "text": lambda m: TEXT["open_clip"](m, *text_inputs("open_clip")),
            },
            lambda m: m.set_grad_checkpointing(True),
            ("cls", "pair"),
        ),
        Family(
            "open_clip_unequal",
            lambda: tm.open_clip_model(vision_layers=4, text_layers=2),
            {
                "image": lambda m: IMAGE["open_clip"](m, tm.images()),
                "text": lambda m: TEXT["open_clip"](m, *text_inputs("open_clip")),
            },
            lambda m: m.set_grad_checkpointing(True),
            ("cls", "pair"),
        ),
        Family(
            "hf_clip",
            tm.hf_clip_model,
            {
                "image": lambda m: IMAGE["hf_clip"](m, tm.images()),
                "text": lambda m: TEXT["hf_clip"](m, *text_inputs("hf_clip")),
            },
            _hf_gc,
            ("cls", "pair"),
        ),
        Family(
            "hf_blip",
            tm.hf_blip_retrieval,
            {
                "image": lambda m: IMAGE["hf_blip"](m, tm.images()),
                "text": lambda m: TEXT["hf_blip"](m, *text_inputs("hf_blip")),
            },
            _hf_gc,
            ("cls",),
        ),
    ]
}


def family_towers(towers: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(family, tower)`` for every family tower whose modality is in ``towers``."""
    return [(f.name, t) for f in FAMILIES.values() for t in f.forwards if t in towers]
