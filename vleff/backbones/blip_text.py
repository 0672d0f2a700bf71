"""Hugging Face BLIP text towers: ``BlipTextModel`` as encoder (``text_encoder`` of
``BlipForImageTextRetrieval`` / ``BlipForQuestionAnswering``) and as decoder (the ``bert`` of
the ``BlipTextLMHeadModel`` in ``text_decoder``).

Their layers are post-norm BERT layers with image cross-attention (layout
``"post_norm_cross"``, run by :func:`vleff.backbones.block.run_post_norm_block`)::

    x = LN(x + SelfAttn(x))                     # padding mask; + causal mask in the decoder
    x = LN(x + CrossAttn(x, image_embeds))      # when the library passes image embeddings
    x = LN(x + FFN(x))

The library builds one additive mask for all layers from the padding mask (and the causal
rule when it runs as a decoder). Token methods change the sequence length, so the patch of a
BLIP text tower runs :class:`PaddedTextLayout` ahead of the methods' hooks: it registers the
padding as a token field (reducers gather it with the tokens; ToMe merges padding only with
padding; EViT keeps it out of the ranking), rebuilds the mask from the tokens' input positions
once the length changes, and restores the input layout after the last block, so the decoder's
per-position logits and the library's ``[:, 0]`` pooling see the length they expect.

The text pools at token 0 ([CLS]/[ENC]/[DEC]): it is the tower's one prefix token, and the
layout marks it protected, so the methods that rank by a text tower's pooling token (EViT)
rank by it.

The decoder (``is_decoder=True``: the library's mask is causal) predicts at every position:
the layout marks such a forward (:data:`vleff.backbones.text.CAUSAL_DECODER`), and the
``bert`` of a ``BlipTextLMHeadModel`` is known as a decoder before it runs
(:meth:`HFBlipTextAdapter.causal_decoder_in`), so token methods can refuse it at apply time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vleff.backbones.base import (
    AttentionConfig,
    BlockParts,
    CrossAttentionParts,
    CrossInputs,
    Pooling,
    TowerAdapter,
)
from vleff.backbones.block import mask_to_bias
from vleff.backbones.hooks import TowerHook
from vleff.backbones.state import TokenState, gather_tokens
from vleff.backbones.text import (
    CAUSAL_DECODER,
    LAYOUT_HOOK,
    PAD,
    POSITION,
    PROTECTED,
    SOURCE,
    TextLayout,
)


def masked_keys(mask: torch.Tensor) -> torch.Tensor:
    """``[B, Nk]`` bool: keys the library's attention mask hides from every query (padding).

    Read from the last query row: in a causal mask it sees every key that is not padding, and a
    padding-only mask has equal rows. Float masks are additive (Hugging Face fills with the
    dtype's minimum); bool masks mark allowed keys."""
    if mask.dtype == torch.bool:
        hidden = ~mask
    else:
        hidden = mask <= torch.finfo(mask.dtype).min / 2
    return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])[:, -1]


def is_causal_mask(mask: torch.Tensor | None) -> bool:
    """Whether the library's attention mask hides from some query a key that its last query sees
    (a causal mask: BLIP's text run with ``is_decoder=True``); a padding-only mask has equal rows."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] < 2:
        return False
    hidden = ~mask if mask.dtype == torch.bool else mask <= torch.finfo(mask.dtype).min / 2
    hidden = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    return bool((hidden[:, :-1] & ~hidden[:, -1:]).any())


class PaddedTextLayout(TextLayout):
    """The tower-level hook of a patched BLIP text tower (see the module docstring).

    Fields it registers: ``position`` (input position, reduce ``max``), ``protected`` (token 0,
    the pooled token), ``pad`` (the library's key padding, 1 = padding; reducers keep it apart)
    and ``text_source`` (input positions each token holds, for restoring the layout).
    """

    name = LAYOUT_HOOK
    replayable = True

    def __init__(self, adapter: TowerAdapter) -> None:  # noqa: D107 - no ids to capture
        self.adapter = adapter
        self.ids = None

    def start(self, x: torch.Tensor, state: TokenState) -> torch.Tensor:
        b, n = x.shape[:2]
        positions = torch.arange(n, device=x.device).expand(b, n)
        state.register(POSITION, positions, "max")
        state.register(PROTECTED, (positions == 0).long(), "max")
        state.register(PAD, torch.zeros(b, n, dtype=torch.long, device=x.device), "max")
        state.register(SOURCE, torch.eye(n, device=x.device, dtype=torch.float32).expand(b, n, n), "sum")
        return x

    def library_mask(self, mask: torch.Tensor | None, is_causal: bool, state: TokenState):
        if LAYOUT_HOOK not in state.scratch:  # block 0: the library's mask for the input positions
            state.scratch[LAYOUT_HOOK] = mask
            state.scratch[CAUSAL_DECODER] = is_causal_mask(mask)
            if mask is not None:
                hidden = masked_keys(mask)[:, -state.num_input_tokens :]  # a cache puts past keys in front
                hidden = hidden.expand(state.batch_size, -1).long()
                state.set(PAD, gather_tokens(hidden, state.get(POSITION)))
        return super().library_mask(mask, is_causal, state)

    def attention_bias(self, state: TokenState, dtype: torch.dtype) -> torch.Tensor | None:
        """Once the length changed: the library's own mask, read at the tokens' input positions
        (query row ``position[i]``, key column ``position[j]``), so padding and the decoder's
        causal order hold for merged, pruned and reordered tokens alike."""
        if not self.changed(state):
            return None
        mask = state.scratch.get(LAYOUT_HOOK)
        if mask is None:
            return None
        pos = state.get(POSITION)
        b, n = pos.shape
        full = mask_to_bias(mask, dtype)
        full = full.reshape(full.shape[0], -1, full.shape[-1]).expand(b, -1, -1)  # [B, Nq0 or 1, N0]
        rows = full if full.shape[1] == 1 else full.gather(1, pos[:, :, None].expand(-1, -1, full.shape[-1]))
        rows = rows.expand(b, n, -1)
        return rows.gather(2, pos[:, None, :].expand(-1, n, -1))[:, None]


class HFBlipTextAdapter(TowerAdapter):
    """``BlipTextModel`` (encoder or the decoder's ``bert``): eager attention, post-norm layers."""

    family = "transformers"
    modality = "text"
    layout = "post_norm_cross"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        return isinstance(module, BlipTextModel)

    def blocks(self) -> list[nn.Module]:
        return list(self.root.encoder.layer)

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def pooling(self) -> Pooling:
        return "cls"

    @property
    def embed_dim(self) -> int:
        return int(self.root.config.hidden_size)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """BLIP reads its text at token 0 (pooler, ITM head, ITC projection)."""
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)

    def layout_hook(self) -> TowerHook:
        return PaddedTextLayout(self)

    def input_grad_hooks(self) -> list[tuple[nn.Module, str, Callable[..., Any]]]:
        """Hugging Face checkpoints this tower itself (its ``enable_input_require_grads`` makes the
        block input require gradients); what breaks is its in-place position add on that input
        (:class:`vleff.backbones.input_grads.WordEmbeddingsOutOfPlace`)."""
        from vleff.backbones.input_grads import FORWARD_PRE_KWARGS, WordEmbeddingsOutOfPlace

        return [(self.root.embeddings, FORWARD_PRE_KWARGS, WordEmbeddingsOutOfPlace())]

    def causal_decoder_in(self, model: nn.Module) -> bool:
        """``True`` when ``model`` holds this tower as the ``bert`` of a ``BlipTextLMHeadModel``
        (BLIP captioning's and VQA's ``text_decoder``), which the library always runs with
        ``is_decoder=True``. A tower applied to on its own is caught at run time instead."""
        from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

        return any(isinstance(m, BlipTextLMHeadModel) and m.bert is self.root for m in model.modules())

    def cross_attention_parts(self, block: nn.Module) -> CrossAttentionParts | None:
        """The layer's ``crossattention`` (present when the text config is a decoder, BLIP's
        default): query, key (from the image width), value, output dense, and its ``LayerNorm``."""
        cross = getattr(block, "crossattention", None)
        if cross is None:
            return None
        attn, out = cross.self, cross.output
        return CrossAttentionParts((attn.query, attn.key, attn.value, out.dense), out.LayerNorm)

    def task_heads(self, model: nn.Module) -> list[nn.Module]:
        """The image-text matching head of a retrieval model whose ``text_encoder`` is this tower
        (``itm_head`` reads its token 0). The decoder's language-model head is not one: its weight
        is tied to the word embeddings, so training it would train the embeddings."""
        return [
            m.itm_head
            for m in model.modules()
            if getattr(m, "text_encoder", None) is self.root and isinstance(getattr(m, "itm_head", None), nn.Module)
        ]

    def block_checkpoint(self, block: nn.Module) -> Callable[..., Any] | None:
        from vleff.backbones.hf import hf_block_checkpoint

        return hf_block_checkpoint(block)

    def gradient_checkpointing(self) -> bool:
        # transformers 5 keeps the flag on every GradientCheckpointingLayer (the blocks) as well
        return super().gradient_checkpointing() or any(
            getattr(b, "gradient_checkpointing", False) is True for b in self.blocks()[:1]
        )

    # --- block level ---------------------------------------------------------------------------
    def parts(self, block: nn.Module) -> BlockParts:
        identity = nn.Identity()
        return BlockParts(
            block.attention.output.LayerNorm,
            block.output.LayerNorm,
            block.intermediate,
            identity,
            identity,
            identity,
            identity,
        )

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        attn = block.attention.self
        return AttentionConfig(
            num_heads=attn.num_attention_heads,
            scale=attn.attention_head_size**-0.5,
            dropout_p=attn.dropout.p,
            fused=False,
        )

    def qkv(self, block, h):
        attn = block.attention.self
        shape = (*h.shape[:-1], -1, attn.attention_head_size)
        return tuple(proj(h).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))

    def attn_out(self, block, o, h):
        out = block.attention.output
        return out.dropout(out.dense(o))

    def ffn(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block.output
        return out.dropout(out.dense(block.intermediate(x)))

    def block_inputs(
        self,
        block,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cache=None,
        **kwargs,
    ):
        return hidden_states, attention_mask, False

    def cross_inputs(
        self,
        block,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cache=None,
        **kwargs,
    ) -> CrossInputs:
        if cache is None:  # the deprecated name the library's own forward still accepts
            cache = kwargs.get("past_key_values")
        return CrossInputs(encoder_hidden_states, encoder_attention_mask, cache)

    def cached_kv(self, block, k, v, cross):
        """The library's cache update; for part of the batch (``cross.rows``) the new positions of
        every row are written at once, the skipped rows' from ``cross.skipped``, and the running
        rows' keys and values are returned."""
        if cross.cache is None:
            return k, v
        own = self._self_cache(cross.cache)
        if cross.rows is None:
            return own.update(k, v, block.attention.self.layer_idx)
        skipped, k_skip, v_skip = cross.skipped
        keys, values = (
            new.new_empty((new.shape[0] + skipped.shape[0], *new.shape[1:]))
            .index_copy(0, cross.rows, new)
            .index_copy(0, skipped, other.to(new.dtype))
            for new, other in ((k, k_skip), (v, v_skip))
        )
        keys, values = own.update(keys, values, block.attention.self.layer_idx)
        return keys[cross.rows], values[cross.rows]

    @staticmethod
    def _self_cache(cache: Any) -> Any:
        from transformers.cache_utils import EncoderDecoderCache

        return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache

    def cache_length(self, cache: Any) -> int:
        return 0 if cache is None else int(self._self_cache(cache).get_seq_length())

    def cache_entries(self, cache: Any, block: nn.Module, rows: torch.Tensor, count: int):
        """The self-attention cache of ``BlipTextModel`` (a ``DynamicCache``, the self-attention half
        of an ``EncoderDecoderCache``) keeps ``[B, H, T, Dh]`` keys and values per layer index."""
        layer = self._self_cache(cache).layers[block.attention.self.layer_idx]
        return layer.keys[rows, :, -count:], layer.values[rows, :, -count:]

    def append_cache(self, cache: Any, block: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._self_cache(cache).update(keys, values, block.attention.self.layer_idx)

    def cross_attention(self, block, x, cross):
        """The library's own cross-attention module (its cache handling included). Its image
        keys never change length; a mask written for the input text length (rows per query,
        all equal: it masks image keys only) is cut to one broadcast row once the text is reduced."""
        if cross.encoder_hidden_states is None:
            return x
        if cross.rows is not None:
            return self._cross_attention_rows(block, x, cross)
        mask = cross.encoder_attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[-2] not in (1, x.shape[1]):
            mask = mask[..., :1, :]
        return block.crossattention(
            x, attention_mask=mask, encoder_hidden_states=cross.encoder_hidden_states, cache=cross.cache
        )[0]

    def _cross_attention_rows(self, block, x, cross):
        """The library's cross-attention for the running rows of a generation step: the image keys
        and values the library cached at the first step, read at those rows (recomputing them from
        the image would cost more than the layer saves)."""
        from transformers.cache_utils import EncoderDecoderCache

        attn, cache = block.crossattention.self, cross.cache
        if not isinstance(cache, EncoderDecoderCache) or not cache.is_updated.get(attn.layer_idx):
            raise RuntimeError(
                f"{self.describe()}: a generation step runs part of the batch, but the library has not cached the "
                "image keys of the cross-attention yet (a step before the first full one)"
            )
        layer = cache.cross_attention_cache.layers[attn.layer_idx]
        keys, values = layer.keys[cross.rows], layer.values[cross.rows]
        q = attn.query(x).view(*x.shape[:-1], -1, attn.attention_head_size).transpose(1, 2)
        scores = q @ keys.transpose(-1, -2) / attn.attention_head_size**0.5
        mask = cross.encoder_attention_mask
        if mask is not None:
            scores = scores + mask.to(scores.dtype)
        context = attn.dropout(scores.softmax(dim=-1)) @ values
        return block.crossattention.output(context.transpose(1, 2).reshape(*x.shape[:-1], -1), x)
