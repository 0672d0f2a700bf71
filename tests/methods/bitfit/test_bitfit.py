"""BitFit: which parameters train (analytic counts on the tiny towers and ViT-B/16), exact start and
removal, trainable-only checkpoints, a real fit where only the biases and the head move."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch

import vleff
from vleff.methods.bitfit import apply_bitfit, bias_names, bitfit_parameters, bitfit_state_dict, remove_bitfit

C = 64  # the tiny towers' width


def timm_bias_count(depth: int, width: int, hidden: int) -> int:
    """Every bias of a timm ViT without its head: per block qkv 3C, proj C, fc1 hidden, fc2 C,
    norm1 and norm2 C each; the patch embedding's C and the final norm's C."""
    return depth * (3 * width + width + hidden + width + 2 * width) + width + width


def test_bitfit_trains_exactly_the_biases_and_the_head_on_the_tiny_vit():
    model = tm.timm_vit()
    apply_bitfit(model)
    depth, hidden = len(model.blocks), model.blocks[0].mlp.fc1.out_features
    head = model.head.weight.numel() + model.head.bias.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == timm_bias_count(depth, C, hidden) + head
    assert sum(p.numel() for p in bitfit_parameters(model)) == trainable
    # the LayerNorm scales stay frozen, their biases train
    assert not model.blocks[0].norm1.weight.requires_grad and model.blocks[0].norm1.bias.requires_grad
    remove_bitfit(model)
    apply_bitfit(model, train_head=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == timm_bias_count(depth, C, hidden)


def test_bitfit_on_vit_b16_trains_the_papers_102912_biases():
    import timm

    with torch.device("meta"):  # counts only: no memory, no init
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
    apply_bitfit(model, train_head=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == timm_bias_count(12, 768, 3072) == 102_912


def test_open_clip_text_biases_are_its_own_not_the_image_towers():
    model = tm.open_clip_model()
    text = bias_names(model, "text")
    image = bias_names(model, "image")
    assert text and image and not set(text) & set(image)
    assert all(not n.startswith("visual.") for n in text) and all(n.startswith("visual.") for n in image)
    assert set(bias_names(model, "all")) == set(text) | set(image)


def test_remove_restores_flags_and_apply_again_replaces():
    model = tm.timm_vit()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)  # flags that are not all True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_bitfit(model)
    apply_bitfit(model, train_head=False)  # replaces
    assert not model.head.weight.requires_grad
    remove_bitfit(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="not applied"):
        remove_bitfit(model)


def test_bitfit_refuses_another_selective_method_and_bad_settings():
    with pytest.raises(ValueError, match="train_head"):
        apply_bitfit(tm.timm_vit(), train_head="no")
    with pytest.raises(ValueError, match="towers"):
        apply_bitfit(tm.timm_vit(), towers="audio")
    with pytest.raises(TypeError, match="text"):
        apply_bitfit(tm.timm_vit(), towers="text")


def test_callback_fit_moves_only_biases_and_head_and_checkpoints_only_them(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tl.trainer(tmp_path, [vleff.callbacks.BitFit()], max_steps=3, max_epochs=-1)
    trainer.fit(module, tl.loader(8, seed=1))
    moved = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    expected = {f"model.{n}" for n in bias_names(module.model)} | {"model.head.weight", "model.head.bias"}
    assert moved == expected
    path = tmp_path / "bitfit.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert set(saved) == expected
    assert set(bitfit_state_dict(module)) == expected  # the callback applied it to the module holding the ViT


def test_mixin_applies_bitfit_in_init():
    class Module(vleff.callbacks.mixins.BitFitMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_bitfit(train_head=False)

    module = Module()
    assert {n for n, p in module.model.named_parameters() if p.requires_grad} == set(bias_names(module.model))
