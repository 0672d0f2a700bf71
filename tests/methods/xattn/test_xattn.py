"""Xattn: which parameters train (an analytic count on BLIP-base and a name filter independent of
the adapter on the tiny BLIP models), encoder / decoder choice, refusals of towers without
cross-attention, exact removal, the gradients of the unfrozen model, a real fit that moves only the
cross-attention and the ITM head and checkpoints only them."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch

import vleff
from vleff.methods.xattn import apply_xattn, cross_attention_names, remove_xattn, xattn_parameters, xattn_state_dict


def cross_names(model: torch.nn.Module, under: str, norms: bool = True) -> set[str]:
    """Every parameter below a ``crossattention`` of the text model at ``under`` (by name: the
    official code's ``encoder_attn`` filter, not the adapter's modules)."""
    return {
        n
        for n, _ in model.named_parameters()
        if n.startswith(under) and ".crossattention." in n and (norms or ".LayerNorm." not in n)
    }


def xattn_count(layers: int, width: int, image_width: int, norms: bool = True) -> int:
    """Per layer: query and output C x C + C; key and value from the image width, C x E + C each;
    the LayerNorm's scale and shift 2C."""
    per_layer = 2 * (width * width + width) + 2 * (width * image_width + width) + (2 * width if norms else 0)
    return layers * per_layer


def test_blip_base_text_model_trains_28366848_cross_attention_parameters():
    from transformers import BlipConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    cfg = BlipConfig().text_config  # BLIP-base defaults: 12 layers, width 768, image width 768
    with torch.device("meta"):  # counts only: no memory, no init
        model = BlipTextModel(cfg, add_pooling_layer=False)
    total = sum(p.numel() for p in model.parameters())
    apply_xattn(model, train_head=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers, width, image = cfg.num_hidden_layers, cfg.hidden_size, cfg.encoder_hidden_size
    assert trained == xattn_count(layers, width, image) == 28_366_848
    assert round(100 * trained / total, 1) == 20.7
    remove_xattn(model)
    apply_xattn(model, train_norms=False)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == xattn_count(layers, width, image, norms=False) == 28_348_416


def test_retrieval_trains_the_encoders_cross_attention_and_the_itm_head():
    model = tm.hf_blip_retrieval()
    apply_xattn(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == cross_names(model, "text_encoder.") | {"itm_head.weight", "itm_head.bias"}
    cfg = model.config.text_config
    heads = model.itm_head.weight.numel() + model.itm_head.bias.numel()
    count = xattn_count(cfg.num_hidden_layers, cfg.hidden_size, cfg.encoder_hidden_size)
    assert sum(p.numel() for p in xattn_parameters(model)) == count + heads
    remove_xattn(model)
    apply_xattn(model, train_norms=False, train_head=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == cross_names(model, "text_encoder.", False)


@pytest.mark.parametrize(
    "text_models, prefixes",
    [("all", ("text_encoder.", "text_decoder.")), ("encoder", ("text_encoder.",)), ("decoder", ("text_decoder.",))],
)
def test_vqa_text_models_choose_encoder_decoder_or_both(text_models, prefixes):
    model = tm.hf_blip_vqa()
    apply_xattn(model, text_models=text_models)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set().union(*(cross_names(model, p) for p in prefixes))  # VQA has no ITM head
    assert set(cross_attention_names(model, text_models)) == trained


def test_captioning_trains_the_decoders_cross_attention_and_refuses_an_encoder():
    model = tm.hf_blip_captioning()
    apply_xattn(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == cross_names(model, "text_decoder.")
    remove_xattn(model)
    with pytest.raises(TypeError, match=r"text_models='encoder'.*has no cross-attending encoder.*decoder"):
        apply_xattn(model, text_models="encoder")
    assert all(p.requires_grad for p in model.parameters())  # refused before any change


@pytest.mark.parametrize("make", [tm.timm_vit, tm.open_clip_model, tm.hf_clip_model])
def test_towers_without_cross_attention_are_refused_naming_them_and_what_is_supported(make):
    model = make()
    with pytest.raises(TypeError, match=r"Xattn does not support .*(timm|open_clip|transformers).*BLIP"):
        apply_xattn(model)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(TypeError, match="BLIP"):
        apply_xattn(tm.hf_blip_retrieval().vision_model)  # BLIP's own image tower has none either


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="train_norms='yes'"):
        apply_xattn(tm.hf_blip_retrieval(), train_norms="yes")
    with pytest.raises(ValueError, match=r"text_models='both'.*\('all', 'encoder', 'decoder'\)"):
        apply_xattn(tm.hf_blip_retrieval(), text_models="both")
    with pytest.raises(ValueError, match="towers='image'.*text"):
        apply_xattn(tm.hf_blip_retrieval(), towers="image")


def test_remove_restores_flags_apply_again_replaces_and_other_selective_methods_refuse():
    model = tm.hf_blip_retrieval()
    model.vision_model.embeddings.patch_embedding.weight.requires_grad_(False)  # flags not all True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_xattn(model)
    apply_xattn(model, train_head=False)  # replaces
    assert not model.itm_head.weight.requires_grad
    with pytest.raises(ValueError, match="cannot apply bitfit while xattn"):
        vleff.apply_bitfit(model, towers="text")
    remove_xattn(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="not applied"):
        remove_xattn(model)
    vleff.apply_bitfit(model, towers="text")
    with pytest.raises(ValueError, match="cannot apply xattn while bitfit"):
        apply_xattn(model)


def test_trained_gradients_equal_the_unfrozen_models_and_nothing_else_gets_one():
    """The selection changes what trains, not the function: each trained parameter's gradient is
    the unfrozen model's (autograd on the library model), and no frozen parameter gets one."""
    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().double().train()
    ids, mask = tm.blip_token_ids()
    images = tm.images().double()

    def loss(m):
        return m(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score.square().sum()

    loss(model).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    apply_xattn(model)
    loss(model).backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == cross_names(model, "text_encoder.") | {"itm_head.weight", "itm_head.bias"}
    for n, g in got.items():
        torch.testing.assert_close(g, full[n], atol=1e-12, rtol=1e-10, msg=n)


def test_callback_fit_moves_only_cross_attention_and_head_and_checkpoints_only_them(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyBLIP()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tl.trainer(tmp_path, [vleff.callbacks.Xattn()], max_steps=3, max_epochs=-1)
    trainer.fit(module, tl.blip_loader(8, seed=1))
    moved = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    expected = {f"model.{n}" for n in cross_names(module.model, "text_encoder.")} | {
        "model.itm_head.weight",
        "model.itm_head.bias",
    }
    assert moved == expected
    path = tmp_path / "xattn.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert set(saved) == expected
    assert set(xattn_state_dict(module)) == expected


def test_mixin_applies_xattn_in_init():
    class Module(vleff.callbacks.mixins.XattnMixin, tl.TinyBLIP):
        def __init__(self) -> None:
            super().__init__()
            self.use_xattn(text_models="encoder", train_norms=False)

    module = Module()
    trained = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained == cross_names(module.model, "text_encoder.", False) | {"itm_head.weight", "itm_head.bias"}
