"""DoRA through peft: counts, exact start, the paper's formula, exact remove, refusals, the
callback with adapter-only checkpoints."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.dora import apply_dora, dora_parameters, remove_dora

C = 64  # the tiny towers' width
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def dora_count(r: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA's ``r·(in + out)`` plus one magnitude per output row, for each ``(out, in)`` target."""
    return sum(r * (i + o) + o for o, i in shapes)


@pytest.mark.parametrize("family, tower", CASES)
def test_dora_starts_exactly_at_the_frozen_model_and_counts_its_parameters(family, tower):
    assert max_start_change(family, tower, lambda m: apply_dora(m, r=4)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_dora(model, r=4)
    # timm: 3 blocks, one fused qkv (3C x C); HF CLIP: 2 + 2 blocks, q/k/v each (C x C)
    shapes = [(3 * C, C)] * 3 if family == "timm_vit" else [(C, C)] * 3 * 4
    assert sum(p.numel() for p in dora_parameters(model)) == dora_count(4, shapes)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == dora_count(4, shapes) + (
        10 * C + 10 if family == "timm_vit" else 0  # the timm head trains
    )


def test_dora_output_is_the_papers_formula_in_float64():
    """``W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_row``, worked out here from the adapter's tensors."""
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    apply_dora(model, r=4, alpha=8.0)
    layer = model.blocks[1].attn.qkv
    with torch.no_grad():
        for p in dora_parameters(model):
            p.normal_()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m = layer.lora_magnitude_vector["default"].weight
        w0, bias = layer.base_layer.weight, layer.base_layer.bias
        w = w0 + (8.0 / 4) * b @ a
        expected_weight = m[:, None] * w / w.norm(dim=1, keepdim=True)
        x = torch.randn(2, 5, C, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ expected_weight.T + bias, atol=1e-10, rtol=1e-10)
    # m starts at the row norms of W0: the start is exact
    fresh = tm.timm_vit().double()
    apply_dora(fresh, r=4)
    q = fresh.blocks[0].attn.qkv
    torch.testing.assert_close(q.lora_magnitude_vector["default"].weight, q.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_dora_remove_restores_names_flags_and_state_exactly(family):
    def perturb(model):
        for p in dora_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, lambda m: apply_dora(m, r=2), remove_dora, perturb)


def test_dora_refusals_name_the_setting_the_tower_and_what_is_supported():
    with pytest.raises(ValueError, match="r=0"):
        vleff.callbacks.DoRA(r=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_dora(tm.timm_vit(), dropout=1.0)
    model = tm.open_clip_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match=r"DoRA does not support open_clip image tower.*timm ViT and Hugging Face CLIP"):
        apply_dora(model, towers="image")
    with pytest.raises(TypeError, match=r"in_proj_weight"):
        apply_dora(model, towers="text")
    assert model.state_dict().keys() == before.keys() and not vleff.get_method("dora").is_applied(model)
    with pytest.raises(TypeError, match="DoRA does not support"):
        apply_dora(tm.hf_blip_retrieval())
    with pytest.raises(ValueError, match="method='vera' is not a peft tuner.*dora"):
        vleff.apply_peft(tm.timm_vit(), method="vera")


def test_apply_peft_and_the_peft_callback_reach_dora():
    model = vleff.apply_peft(tm.timm_vit(), method="dora", r=2)
    assert vleff.get_method("dora").is_applied(model) and not vleff.get_method("lora").is_applied(model)
    vleff.remove_peft(model)
    assert not vleff.get_method("dora").is_applied(model)
    callback = vleff.callbacks.PEFT(method="dora", r=2)
    assert type(callback) is vleff.callbacks.DoRA and callback.config.r == 2


def test_dora_callback_trains_only_the_adapters_and_saves_them_alone(tmp_path):
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    base = module.model.blocks[0].attn.qkv.weight.detach().clone()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.DoRA(r=2)], max_steps=3)
    trainer.fit(module, tl.loader(8))
    qkv = module.model.blocks[0].attn.qkv
    assert torch.equal(qkv.base_layer.weight, base)  # the base did not move
    assert not torch.equal(qkv.lora_magnitude_vector["default"].weight, base.norm(dim=1))  # m trained
    trainer.save_checkpoint(tmp_path / "dora.ckpt")
    saved = torch.load(tmp_path / "dora.ckpt", weights_only=False)
    keys = set(saved["state_dict"])
    assert keys and all("lora_" in k or k.startswith("model.head.") for k in keys), sorted(keys)
    assert saved["vleff_methods"][0]["method"] == "dora"

    class Fresh(tl.TinyClassifier):
        def on_load_checkpoint(self, checkpoint):
            vleff.callbacks.restore_methods(self, checkpoint)

    torch.manual_seed(1)  # the same base model as the run was built with
    loaded = Fresh.load_from_checkpoint(tmp_path / "dora.ckpt")
    x = tm.images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x), atol=0, rtol=0)


def test_peft_mixin_applies_the_named_tuner_in_init():
    from vleff.callbacks import PeftMixin

    class Module(PeftMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_peft("dora", r=2)

    module = Module()
    assert vleff.get_method("dora").is_applied(module.model)  # found from the model inside, too
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("model.head.") for n in trainable)
    with pytest.raises(ValueError, match="method='bitfit' is not a peft tuner"):
        Module.use_peft(module, "bitfit")
