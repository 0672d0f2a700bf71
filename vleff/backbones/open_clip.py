"""open_clip CLIP: the image tower (``VisionTransformer``) and the text tower (the ``CLIP``
model's own ``transformer``, or ``TextTransformer`` in ``CustomTextCLIP``), whose blocks are
``ResidualAttentionBlock`` with ``nn.MultiheadAttention`` (a raw ``in_proj_weight``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vleff.backbones.base import (
    AttentionConfig,
    AttentionWeights,
    BlockParts,
    Pooling,
    TowerAdapter,
)
from vleff.backbones.sharding import library_type


def _check_blocks(root: nn.Module, transformer: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for i, block in enumerate(transformer.resblocks):
        if library_type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise TypeError(
                f"open_clip {type(root).__name__} block {i} is {type(block).__name__}; vleff supports "
                "self-attention open_clip.transformer.ResidualAttentionBlock"
            )


class _OpenClipTower(TowerAdapter):
    family = "open_clip"

    def __init__(self, root: nn.Module, transformer: nn.Module) -> None:
        super().__init__(root)
        self.transformer = transformer
        self.sequence_first = not getattr(transformer, "batch_first", True)
        _check_blocks(root, transformer)

    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.resblocks)

    def block_container(self) -> nn.Module | None:
        """The ``Transformer`` (``forward(x, attn_mask)`` over ``resblocks``)."""
        return self.transformer

    def attention_weights(self, block: nn.Module) -> AttentionWeights:
        """``nn.MultiheadAttention``'s fused ``in_proj_weight``/``in_proj_bias`` and ``out_proj``."""
        mha = block.attn
        return AttentionWeights(
            mha.in_proj_weight, mha.in_proj_bias, mha.out_proj, {"qkv": mha.in_proj_weight, "out": mha.out_proj.weight}
        )

    @property
    def embed_dim(self) -> int:
        return int(self.transformer.width)

    def parts(self, block: nn.Module) -> BlockParts:
        identity = nn.Identity()
        return BlockParts(block.ln_1, block.ln_2, block.mlp, block.ls_1, block.ls_2, identity, identity)

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        mha = _mha(block)
        return AttentionConfig(num_heads=mha.num_heads, scale=mha.head_dim**-0.5, dropout_p=mha.dropout, fused=True)

    def qkv(self, block, h):
        mha = _mha(block)
        b, n, _ = h.shape
        qkv = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
        return qkv.reshape(b, n, 3, mha.num_heads, mha.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attn_out(self, block, o, h):
        return block.attn.out_proj(o)

    def block_inputs(self, block, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise TypeError("vleff's open_clip adapter handles self-attention blocks only (k_x/v_x given)")
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q_x.dtype)
        return q_x, attn_mask, False


class OpenClipVisionAdapter(_OpenClipTower):
    modality = "image"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from open_clip.transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    def __init__(self, root: nn.Module) -> None:
        super().__init__(root, root.transformer)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if getattr(self.root, "class_embedding", None) is not None else 0

    @property
    def pooling(self) -> Pooling:
        if getattr(self.root, "attn_pool", None) is not None:
            return "map"
        return {"tok": "cls", "avg": "avg"}.get(self.root.pool_type, "none")

    def side_final_norm(self) -> tuple[nn.Module, bool]:
        """``ln_post``: over every token unless the model normalizes after pooling; class-token
        pooling only (side methods feed the cls token)."""
        if getattr(self.root, "attn_pool", None) is not None or self.pooling != "cls":
            raise TypeError(
                f"side tuning does not support {self.describe()} (attention or average pooling); "
                "it supports open_clip image towers pooled at the class token"
            )
        return self.root.ln_post, not bool(getattr(self.root, "final_ln_after_pool", False))


class OpenClipTextAdapter(_OpenClipTower):
    """Text tower: causal mask, pooled at the EOT token (argmax of token ids)."""

    modality = "text"

    def side_final_norm(self) -> tuple[nn.Module, bool]:
        """``ln_final``, over every token (the EOT row is pooled after it)."""
        return self.root.ln_final, True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from open_clip.model import CLIP
        from open_clip.transformer import TextTransformer

        return isinstance(module, TextTransformer) or (isinstance(module, CLIP) and hasattr(module, "token_embedding"))

    def __init__(self, root: nn.Module) -> None:
        super().__init__(root, root.transformer)

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    @property
    def pooling(self) -> Pooling:
        return "eot"

    def id_embedding(self) -> nn.Module:
        return self.root.token_embedding

    def skipped_companions(self) -> list[str]:
        visual = getattr(self.root, "visual", None)
        if visual is None or OpenClipVisionAdapter.matches(visual):
            return []
        return [f"open_clip image tower {type(visual).__name__} (not a transformer: it has no token sequence)"]

    def unsupported_reason(self) -> str | None:
        if getattr(self.root, "cls_emb", None) is not None:
            return (
                "its text tower appends a learned CLS token after the token embedding (CoCa's embed_cls), so the "
                "blocks see one token more than the ids vleff tracks causal order and padding by; CoCa's text "
                "tower is not supported (its image tower is: towers='image')"
            )
        return None

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        pool = getattr(self.root, "text_pool_type", None) or getattr(self.root, "pool_type", "argmax")
        if pool == "argmax":
            return ids.argmax(dim=-1)
        if pool == "eos":
            eos = getattr(self.root, "text_eos_id", None) or getattr(self.root, "eos_id", None)
            return (ids == eos).int().argmax(dim=-1)
        if pool == "first":
            return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        if pool == "last":
            return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)
        raise TypeError(f"{self.describe()} pools its text with pool_type={pool!r}, which vleff does not track")


def _mha(block: nn.Module) -> nn.MultiheadAttention:
    """The block's attention; ``RuntimeError`` when ``peft`` wrapped it (LoRA on ``in_proj_weight``:
    reading the raw weight here would silently bypass the adapter)."""
    mha = block.attn
    if not isinstance(mha, nn.MultiheadAttention):
        # the method that wrapped it: vleff's peft tuners tag their layers (vleff.side.peft_tuners.LAYER_TAG,
        # a layer above this one); LoRA's own layers carry no tag
        tagged = mha.__dict__.get("_vleff_peft_method")
        who = f"{tagged} (peft)" if tagged else "LoRA (peft)"
        undo = f"remove {tagged}" if tagged else "remove lora (vleff.methods.lora.core.remove_lora)"
        raise RuntimeError(
            f"open_clip block attention is a {type(mha).__name__}, not nn.MultiheadAttention: {who} "
            f"wraps in_proj_weight and vleff's generic block would bypass the adapter; "
            f"{undo} before applying a vleff tower hook"
        )
    return mha
