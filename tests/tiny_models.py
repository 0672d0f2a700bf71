"""Small randomly initialised models of every supported family (no downloads)."""

from __future__ import annotations

import torch

IMG = 32
PATCH = 8


def timm_vit(**kwargs):
    from timm.models.vision_transformer import VisionTransformer

    cfg = dict(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=3, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def timm_deit_distilled(**kwargs):
    from timm.models.deit import VisionTransformerDistilled

    cfg = dict(img_size=IMG, patch_size=PATCH, embed_dim=64, depth=3, num_heads=4, num_classes=10)
    cfg.update(kwargs)
    return VisionTransformerDistilled(**cfg)


def open_clip_model(vision_layers: int = 2, text_layers: int = 2):
    """A tiny open_clip CLIP; towers of unequal depth (as ViT-L/14's 24 image and 12 text blocks)
    with ``vision_layers != text_layers``."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=vision_layers, width=64, head_width=16, patch_size=PATCH, image_size=IMG)
    text = CLIPTextCfg(context_length=16, vocab_size=100, width=64, heads=4, layers=text_layers)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def hf_clip_model(attn_implementation: str = "sdpa"):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=98,
            eos_token_id=99,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMG,
            patch_size=PATCH,
        ),
        projection_dim=32,
    )
    cfg._attn_implementation = attn_implementation
    return CLIPModel(cfg)


def blip_config():
    """A tiny BLIP config: 2 text and 2 vision layers of width 64, dropout 0 (so train mode is
    deterministic), initializer_range 0.02 in both towers (BLIP's vision default, 1e-10, makes
    every weight ~0 and every test degenerate)."""
    from transformers import BlipConfig

    return BlipConfig(
        text_config=dict(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            encoder_hidden_size=64,
            bos_token_id=98,
            eos_token_id=99,
            sep_token_id=97,
            pad_token_id=0,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            initializer_range=0.02,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMG,
            patch_size=PATCH,
            initializer_range=0.02,
        ),  # BLIP's default is 1e-10
        projection_dim=32,
        image_text_hidden_size=32,
    )


def hf_blip_retrieval():
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval(blip_config())


def hf_blip_captioning():
    from transformers import BlipForConditionalGeneration

    return BlipForConditionalGeneration(blip_config())


def hf_blip_vqa():
    from transformers import BlipForQuestionAnswering

    return BlipForQuestionAnswering(blip_config())


def blip_token_ids(batch: int = 2, length: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP-style text: a leading [CLS]-like token (98), words, [SEP] (97), then zero padding;
    sample ``i`` has ``5 + 3 i`` real tokens. Returns ``(ids, attention_mask)``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (batch, length), generator=g)
    ids[:, 0] = 98
    for i in range(batch):
        end = 4 + i * 3
        ids[i, end] = 97
        ids[i, end + 1 :] = 0
    return ids, (ids != 0).long()


def images(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def token_ids(batch: int = 2, length: int = 16, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    """Token ids with an EOT (largest id) at a varying position, zero padding after it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab - 2, (batch, length), generator=g)
    for i in range(batch):
        end = 4 + i * 3
        ids[i, end] = vocab - 1
        ids[i, end + 1 :] = 0
    return ids


def hf_llama_lm(vocab: int = 64, width: int = 64, layers: int = 2, **kwargs):
    """A tiny Llama-family causal LM (gated MLP, RMSNorm, RoPE); no eos, so greedy decoding
    runs its full length in every implementation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    cfg.update(kwargs)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def hf_gpt2_lm(vocab: int = 64, width: int = 64, layers: int = 2):
    """A tiny GPT-2 (plain MLP with Conv1D, learned positions), dropout 0, no eos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=width,
        n_layer=layers,
        n_head=4,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(cfg)
