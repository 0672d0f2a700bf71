"""timm ``VisionTransformer`` (ViT, DeiT incl. the distilled variant, register tokens,
layer scale, q/k norm, fused and unfused attention)."""
from __future__ import annotations

from torch import nn

from vleff.backbones.base import AttentionConfig, BlockParts, Pooling, TowerAdapter


class TimmViTAdapter(TowerAdapter):
    family = "timm"
    modality = "image"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(module, VisionTransformer)

    def __init__(self, root: nn.Module) -> None:
        from timm.layers import Attention
        from timm.models.vision_transformer import Block

        super().__init__(root)
        for i, block in enumerate(root.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise TypeError(
                    f"timm {type(root).__name__} block {i} is {type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__} attention; vleff supports pre-norm "
                    "timm.models.vision_transformer.Block with timm.layers.Attention")

    def blocks(self) -> list[nn.Module]:
        return list(self.root.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.root.num_prefix_tokens)

    @property
    def has_cls_token(self) -> bool:
        return getattr(self.root, "cls_token", None) is not None

    @property
    def pooling(self) -> Pooling:
        pool = self.root.global_pool
        return {"token": "cls", "avg": "avg", "avgmax": "avg", "max": "avg", "map": "map"}.get(pool, "none")

    @property
    def embed_dim(self) -> int:
        return int(self.root.embed_dim)

    def parts(self, block: nn.Module) -> BlockParts:
        return BlockParts(block.norm1, block.norm2, block.mlp, block.ls1, block.ls2,
                          block.drop_path1, block.drop_path2)

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        attn = block.attn
        return AttentionConfig(num_heads=attn.num_heads, scale=attn.scale, dropout_p=attn.attn_drop.p,
                               fused=bool(attn.fused_attn))

    def qkv(self, block, h):
        attn = block.attn
        b, n, _ = h.shape
        q, k, v = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_out(self, block, o, h):
        attn = block.attn
        o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        return attn.proj_drop(attn.proj(o))

    def block_inputs(self, block, x, attn_mask=None, is_causal=False):
        return x, attn_mask, bool(is_causal)
