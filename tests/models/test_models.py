"""Model factory and ImageClassifier: names, sizes, towers, clear errors."""

from __future__ import annotations

import pytest
import torch

from vleff.backbones import find_tower
from vleff.models import ImageClassifier, TowerClassifier, build_model


def test_digits_vit_shapes():
    model = build_model("vit_tiny_digits", num_classes=10, image_size=32)
    assert model.patch_embed.num_patches == 64 and len(model.blocks) == 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_alias_and_plain_timm_name():
    model = build_model("deit_small_distilled", num_classes=3, image_size=32)
    assert model.num_prefix_tokens == 2
    plain = build_model("vit_tiny_patch16_224", num_classes=4, image_size=32)
    assert plain(torch.randn(1, 3, 32, 32)).shape == (1, 4)


@pytest.mark.parametrize("name", ["open_clip_vit_b32", "hf_clip_vit_b32"])
def test_clip_towers_are_found_and_classify(name):
    model = build_model(name, num_classes=5, image_size=64)
    assert isinstance(model, TowerClassifier)
    assert find_tower(model, "image").num_prefix_tokens == 1
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_blip_tower_without_head_is_bare_tower():
    from transformers import BlipVisionModel

    tower = build_model("hf_blip_base", image_size=32)
    assert isinstance(tower, BlipVisionModel) and tower.config.image_size == 32


def test_random_init_blip_tower_is_not_degenerate():
    """BlipVisionConfig initialises with std 1e-10; the factory's random init is 0.02 (BLIP's
    text value), unless the caller asks for another."""
    weight = build_model("hf_blip_base", image_size=32).encoder.layers[0].self_attn.qkv.weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.05)
    tiny = build_model("hf_blip_base", image_size=32, initializer_range=1e-3).encoder.layers[0].self_attn.qkv.weight
    assert tiny.std().item() == pytest.approx(1e-3, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"name": "resnet_nonexistent"}, ValueError, "model 'resnet_nonexistent' is not known"),
        (
            {"name": "vit_base", "image_size": 100},
            ValueError,
            "image_size=100 is not a positive multiple of the patch size 16",
        ),
        ({"name": "vit_tiny_digits", "num_classes": 0}, ValueError, "num_classes=0"),
        ({"name": "vit_tiny_digits", "pretrained": True}, ValueError, "no published weights"),
    ],
)
def test_bad_model_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        build_model(**kwargs)


def test_classifier_takes_module_or_name_and_steps():
    import lightning.pytorch as pl

    module = ImageClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)), lr=1e-2)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = module.model[1].weight.detach().clone()
    trainer.fit(module, loader, loader)
    assert not torch.equal(before, module.model[1].weight)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    # val/acc is top-1 over samples (what vleff.cli.evaluate.accuracy and the tables report)
    from vleff.cli.evaluate import accuracy

    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(accuracy(module.model, [(x, y)]), abs=1e-6)
    with pytest.raises(TypeError, match="model must be a model name or an nn.Module"):
        ImageClassifier(model=3)
    with pytest.raises(ValueError, match="lr=0"):
        ImageClassifier(lr=0)
