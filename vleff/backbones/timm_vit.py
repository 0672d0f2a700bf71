"""timm ``VisionTransformer`` (ViT, DeiT incl. the distilled variant, register tokens,
layer scale, q/k norm, fused and unfused attention)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from vleff.backbones.base import (
    AttentionConfig,
    AttentionWeights,
    BlockParts,
    Pooling,
    TowerAdapter,
)
from vleff.backbones.sharding import library_type


class GridIntermediates:
    """``forward_intermediates`` of a patched timm ViT: the library's own, refusing the spatial
    ``output_fmt="NCHW"`` (its default) once tokens were merged or pruned, where timm would fold
    a shorter token sequence into the patch grid without a word (wrong channels, wrong layout)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vleff.backbones.patch import get_patch

        method = type(self.root).forward_intermediates
        out = method(self.root, *args, **kwargs)
        bound = inspect.signature(method).bind(self.root, *args, **kwargs)
        bound.apply_defaults()
        patch = get_patch(self.root)
        state = patch.state if patch is not None else None
        reduced = state is not None and (
            state.num_tokens != state.num_input_tokens or any(n != state.num_input_tokens for n in state.token_counts)
        )
        if bound.arguments.get("output_fmt") == "NCHW" and reduced:
            raise ValueError(
                f"forward_intermediates(output_fmt='NCHW') of a timm {type(self.root).__name__} whose tokens vleff "
                f"merged or pruned ({state.num_input_tokens} -> {state.num_tokens}): merged tokens have no patch grid "
                "to fold back into. Use output_fmt='NLC' (token sequences; merged tokens' sizes in "
                "vleff.backbones.last_token_state), or remove the token method for spatial features"
            )
        return out


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
            if library_type(block) is not Block or library_type(block.attn) is not Attention:
                raise TypeError(
                    f"timm {type(root).__name__} block {i} is {library_type(block).__name__} with "
                    f"{type(getattr(block, 'attn', None)).__name__} attention; vleff supports pre-norm "
                    "timm.models.vision_transformer.Block with timm.layers.Attention"
                )

    def blocks(self) -> list[nn.Module]:
        return list(self.root.blocks)

    def blocks_input_module(self) -> nn.Module | None:
        return getattr(self.root, "norm_pre", None)

    def entry_guards(self) -> dict[str, Any]:
        return (
            {"forward_intermediates": GridIntermediates(self.root)}
            if hasattr(self.root, "forward_intermediates")
            else {}
        )

    def classifier_head(self) -> nn.Module | None:
        """timm's ``head`` (trained with LoRA's ``train_head``; side methods compact its input)."""
        head = getattr(self.root, "head", None)
        return head if isinstance(head, nn.Module) else None

    def attention_weights(self, block: nn.Module) -> AttentionWeights:
        """timm's fused ``attn.qkv`` and ``attn.proj``."""
        attn = block.attn
        return AttentionWeights(
            attn.qkv.weight, attn.qkv.bias, attn.proj, {"qkv": attn.qkv.weight, "out": attn.proj.weight}
        )

    def block_container(self) -> nn.Module | None:
        """The ``blocks`` ``nn.Sequential``."""
        return self.root.blocks

    @property
    def classifier_heads(self) -> int:
        from timm.models.deit import VisionTransformerDistilled

        return 2 if isinstance(self.root, VisionTransformerDistilled) else 1

    def side_final_norm(self) -> tuple[nn.Module, bool]:
        """``root.norm`` over every token; only class-token-pooled, one-head ViTs (not distilled
        DeiT, average or attention pooling), since side methods feed the cls token."""
        from timm.models.deit import VisionTransformerDistilled

        root = self.root
        if (
            isinstance(root, VisionTransformerDistilled)
            or self.pooling != "cls"
            or not isinstance(root.fc_norm, nn.Identity)
            or getattr(root, "attn_pool", None) is not None
        ):
            raise TypeError(
                f"side tuning does not support {self.describe()}: it feeds the cls token of a "
                "class-token-pooled timm ViT (global_pool='token', one head)"
            )
        return root.norm, True

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
        return BlockParts(block.norm1, block.norm2, block.mlp, block.ls1, block.ls2, block.drop_path1, block.drop_path2)

    def attention_config(self, block: nn.Module) -> AttentionConfig:
        attn = block.attn
        return AttentionConfig(
            num_heads=attn.num_heads, scale=attn.scale, dropout_p=attn.attn_drop.p, fused=bool(attn.fused_attn)
        )

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
