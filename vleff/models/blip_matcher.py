"""``BLIPMatcher``: image-text matching (BLIP's ITM head) as a LightningModule, so methods that act
on BLIP's text encoder (Xattn: its cross-attention to the image) train from ``vleff-train``.

A batch is the image-text data module's ``{"images", "tokens", "caption_ids"}``. Each image is
paired with its own caption (a match) and with the next sample's caption (a match only when the two
captions are the same: digits has ten); the ITM head classifies each pair, cross entropy. The text
encoder reads the token ids as they come: a random-init BLIP text model with the tokenizer's
vocabulary size (open_clip's BPE: id 0 is padding, as BLIP's ``pad_token_id``), or a
``transformers`` BLIP retrieval model passed in. Validation logs the matching accuracy.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from vleff.checks import check_int, check_number

__all__ = ["BLIPMatcher", "build_blip_matcher"]


def build_blip_matcher(
    vocab_size: int = 49408, width: int = 64, layers: int = 2, heads: int = 4, image_size: int = 32, patch_size: int = 8
) -> nn.Module:
    """A small random-init ``BlipForImageTextRetrieval`` (both towers ``layers`` deep, width ``width``;
    weights with std 0.02: BLIP's vision default, 1e-10, is degenerate)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    tower = dict(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        initializer_range=0.02,
    )
    text = dict(tower, vocab_size=vocab_size, encoder_hidden_size=width, pad_token_id=0, max_position_embeddings=128)
    vision = dict(tower, image_size=image_size, patch_size=patch_size)
    return BlipForImageTextRetrieval(
        BlipConfig(text_config=text, vision_config=vision, projection_dim=width, image_text_hidden_size=width)
    )


class BLIPMatcher(pl.LightningModule):
    """Train ``model`` (a ``BlipForImageTextRetrieval``, or the settings of :func:`build_blip_matcher`)
    on image-text matching; logs ``train/loss`` and ``val/acc``."""

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        context_length: int | None = None,
        tokenizer: str | None = None,
        **model_kwargs: Any,
    ) -> None:
        """``context_length`` and ``tokenizer`` are read by the data module (the config's
        ``model.context_length`` / ``model.tokenizer``); the model takes the ids as they come."""
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        allowed = {"vocab_size", "width", "layers", "heads", "image_size", "patch_size"}
        if unknown := sorted(set(model_kwargs) - allowed):
            raise ValueError(f"BLIPMatcher does not take {unknown}; the model settings are {sorted(allowed)}")
        for key in ("width", "layers", "heads", "patch_size"):
            if key in model_kwargs:
                check_int(key, model_kwargs[key], low=1)
        self.model = model if model is not None else build_blip_matcher(**model_kwargs)
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)

    def _pairs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = batch["images"], batch["tokens"]
        ids = batch.get("caption_ids", torch.arange(len(tokens), device=tokens.device))
        other = torch.roll(torch.arange(len(tokens), device=tokens.device), 1)
        texts = torch.cat([tokens, tokens[other]])
        labels = torch.cat([torch.ones_like(ids), (ids[other] == ids).long()])
        out = self.model(
            input_ids=texts,
            pixel_values=images.repeat(2, 1, 1, 1),
            attention_mask=(texts != 0).long(),
            use_itm_head=True,
        )
        return out.itm_score, labels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits, labels = self._pairs(batch)
        loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits, labels = self._pairs(batch)
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True, batch_size=len(labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            [p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )
