"""Hugging Face transformers: ``CLIPVisionModel``/``CLIPTextModel`` (also inside ``CLIPModel``
and the ``*WithProjection`` models; separate q/k/v projections) and ``BlipVisionModel``
(inside ``BlipForImageTextRetrieval``, ``BlipForConditionalGeneration`` ...; fused ``qkv``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vleff.backbones.base import (
    AttentionConfig,
    AttentionWeights,
    BlockParts,
    Pooling,
    TowerAdapter,
)

_FUSED_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def hf_block_checkpoint(block: nn.Module) -> Callable[..., Any] | None:
    """transformers 5 checkpoints a ``GradientCheckpointingLayer`` in its class's ``forward``
    when its flag is on, it trains and gradients are on: the same conditions, and its function
    (re-entrant or not, as ``gradient_checkpointing_enable`` set it)."""
    if getattr(block, "gradient_checkpointing", False) is True and block.training and torch.is_grad_enabled():
        return getattr(block, "_gradient_checkpointing_func", None)
    return None


class _HFTower(TowerAdapter):
    family = "transformers"

    def block_checkpoint(self, block: nn.Module) -> Callable[..., Any] | None:
        return hf_block_checkpoint(block)

    def attention_weights(self, block: nn.Module) -> AttentionWeights:
        """Separate ``q_proj``/``k_proj``/``v_proj``, concatenated, and ``out_proj``."""
        att = block.self_attn
        w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        b = None if att.q_proj.bias is None else torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        return AttentionWeights(
            w,
            b,
            att.out_proj,
            {"q": att.q_proj.weight, "k": att.k_proj.weight, "v": att.v_proj.weight, "out": att.out_proj.weight},
        )

    def blocks(self) -> list[nn.Module]:
        return list(self.root.encoder.layers)

    @property
    def embed_dim(self) -> int:
        return int(self.root.config.hidden_size)

    def parts(self, block: nn.Module) -> BlockParts:
        identity = nn.Identity()
        return BlockParts(block.layer_norm1, block.layer_norm2, block.mlp, identity, identity, identity, identity)

    def block_inputs(self, block, hidden_states, attention_mask=None, *args, **kwargs):
        return hidden_states, attention_mask, bool(kwargs.get("is_causal", False))


class HFCLIPAdapter(_HFTower):
    """``CLIPVisionModel`` (pooled at token 0) or ``CLIPTextModel`` (causal, pooled at EOS)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from transformers import CLIPTextModel, CLIPVisionModel

        return isinstance(module, (CLIPVisionModel, CLIPTextModel))

    def __init__(self, root: nn.Module) -> None:
        from transformers import CLIPTextModel

        super().__init__(root)
        self.modality = "text" if isinstance(root, CLIPTextModel) else "image"

    def block_container(self) -> nn.Module | None:
        """The ``encoder`` (called with ``inputs_embeds``/``attention_mask``/``is_causal``)."""
        return self.root.encoder

    def container_output(self, out: torch.Tensor) -> object:
        """The encoder returns a ``BaseModelOutput``."""
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=out)

    def side_final_norm(self) -> tuple[nn.Module, bool]:
        """Image: ``post_layernorm`` on the pooled token; text: ``final_layer_norm`` on every token."""
        if self.modality == "image":
            return self.root.post_layernorm, False
        return self.root.final_layer_norm, True

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.modality == "image" else 0

    @property
    def pooling(self) -> Pooling:
        return "cls" if self.modality == "image" else "eot"

    def id_embedding(self) -> nn.Module | None:
        return self.root.embeddings.token_embedding if self.modality == "text" else None

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        eos = self.root.eos_token_id
        if eos == 2:  # the library's legacy rule (configs from before its eos fix): the largest id
            return ids.to(torch.int).argmax(dim=-1)
        return (ids.to(torch.int) == eos).int().argmax(dim=-1)

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        attn = block.self_attn
        impl = getattr(attn.config, "_attn_implementation", None) or "eager"
        return AttentionConfig(
            num_heads=attn.num_heads,
            scale=attn.scale,
            dropout_p=float(attn.dropout),
            fused=impl in _FUSED_IMPLEMENTATIONS,
            softmax_fp32=True,
        )

    def qkv(self, block, h):
        attn = block.self_attn
        b, n, _ = h.shape
        shape = (b, n, attn.num_heads, attn.head_dim)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_out(self, block, o, h):
        return block.self_attn.out_proj(o)


class HFBlipVisionAdapter(_HFTower):
    """``BlipVisionModel``: eager attention with a fused ``qkv`` Linear, pooled at token 0."""

    modality = "image"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from transformers import BlipVisionModel

        return isinstance(module, BlipVisionModel)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def pooling(self) -> Pooling:
        return "cls"

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        attn = block.self_attn
        return AttentionConfig(num_heads=attn.num_heads, scale=attn.scale, dropout_p=attn.dropout.p, fused=False)

    def qkv(self, block, h):
        attn = block.self_attn
        b, n, _ = h.shape
        return attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attn_out(self, block, o, h):
        return block.self_attn.projection(o)
