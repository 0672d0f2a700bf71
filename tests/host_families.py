"""The host models that "host" methods (MemVP) act on: whole vision-language models rather than
one tower. Each row builds the plain host (tiny random-init real library classes) and runs a
forward whose value depends on the image and the text (logits or text states).

A host method's conformance row names the hosts it supports; the host section of
``test_conformance.py`` runs every such method on every host it names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tiny_models as tm
import torch


@dataclass(frozen=True)
class HostFamily:
    name: str
    make: Callable[[], torch.nn.Module]
    forward: Callable[[torch.nn.Module], torch.Tensor]


def _blip_caption(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = tm.blip_token_ids()
    return model(pixel_values=tm.images(), input_ids=ids, attention_mask=mask).logits


def _blip_vqa(model: torch.nn.Module) -> torch.Tensor:
    """BLIP VQA's question encoder over the image and answer decoder over the question."""
    ids, mask = tm.blip_token_ids()
    image = model.vision_model(pixel_values=tm.images()).last_hidden_state
    q = model.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image).last_hidden_state
    logits = model.text_decoder(input_ids=ids[:, :4], encoder_hidden_states=q, reduction="none").logits
    return torch.cat([q.flatten(1), logits.flatten(1)], dim=1)


def vlm(lm: str = "llama", tower: str = "timm", visual_prompt: str = "memvp", vocab: int = 64):
    """A tiny VisionLanguageModel host (MemVP not applied)."""
    from vleff.models.vlm import VisionLanguageModel

    lms = {"llama": tm.hf_llama_lm, "gpt2": tm.hf_gpt2_lm}
    towers = {"timm": tm.timm_vit, "open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}
    return VisionLanguageModel(towers[tower](), lms[lm](vocab=vocab), visual_prompt, apply_memvp=False)


def _vlm_forward(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    return model(tm.images(), ids)["logits"]


HOSTS: dict[str, HostFamily] = {
    h.name: h
    for h in [
        HostFamily("hf_blip_captioning", tm.hf_blip_captioning, _blip_caption),
        HostFamily("hf_blip_vqa", tm.hf_blip_vqa, _blip_vqa),
        HostFamily("vlm_llama_timm", lambda: vlm("llama", "timm"), _vlm_forward),
        HostFamily("vlm_gpt2_open_clip", lambda: vlm("gpt2", "open_clip"), _vlm_forward),
        HostFamily("vlm_llama_hf_clip", lambda: vlm("llama", "hf_clip"), _vlm_forward),
    ]
}
