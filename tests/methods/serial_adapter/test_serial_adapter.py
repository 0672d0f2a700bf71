"""Serial adapter (Houlsby et al. 2019): against a plain-PyTorch timm ViT with the adapters written
out (float64, the same weights), counts against the analytic formula and the official code's
ViT-B/16 figures, what trains (adapters, LayerNorms, head), exact removal, settings, and real
Lightning fits. What every bottleneck adapter shares (exact start on every family tower, BLIP's
post-norm places, the zero-up-projection learning) is in ``tests/methods/side/test_bottleneck.py``."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F

import vleff
from vleff.methods.serial_adapter.core import (
    SerialAdapterConfig,
    apply_serial_adapter,
    remove_serial_adapter,
    serial_adapter_applied,
    serial_adapter_num_parameters,
    serial_adapter_parameters,
)


def _adapter(x: torch.Tensor, d_w, d_b, u_w, u_b) -> torch.Tensor:
    """Houlsby's ``h + U·GELU(D·h + b_D) + b_U``."""
    return x + F.gelu(x @ d_w.T + d_b) @ u_w.T + u_b


def _timm_reference(model, images: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The timm ViT's forward written out, a serial adapter on ``attn(norm1(x))`` and ``mlp(norm2(x))``."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for i, blk in enumerate(model.blocks):
        a = lambda site: [
            w[f"vleff_serial_adapter.{site}.{i}.{p}"] for p in ("down.weight", "down.bias", "up.weight", "up.bias")
        ]  # noqa: E731
        x = x + blk.ls1(_adapter(blk.attn(blk.norm1(x)), *a("attention")))
        x = x + blk.ls2(_adapter(blk.mlp(blk.norm2(x)), *a("mlp")))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("init_values", [None, 0.5])
def test_serial_adapter_equals_the_reference_forward_on_timm_float64(init_values):
    torch.manual_seed(0)
    model = tm.timm_vit(init_values=init_values).double().eval()
    images = tm.images().double()
    apply_serial_adapter(model, bottleneck=5)
    with torch.no_grad():
        for p in serial_adapter_parameters(model):
            p.normal_(0, 0.2)  # every weight and bias non-zero
        w = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("vleff_serial_adapter.")}
        out = model(images)
        remove_serial_adapter(model)
        ref = _timm_reference(model, images, w)
        plain = model(images)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_init_is_the_official_codes_but_up_is_zero():
    torch.manual_seed(0)
    model = tm.timm_vit()
    apply_serial_adapter(model)
    a = model.vleff_serial_adapter.attention[0]
    assert a.down.weight.shape == (64, model.embed_dim) and a.up.weight.shape == (model.embed_dim, 64)
    assert 5e-4 < a.down.weight.std() < 1.5e-3 and a.down.weight.abs().max() <= 2e-3  # trunc-normal std 1e-3
    assert a.up.weight.abs().max() == 0 and a.down.bias.abs().max() == 0 and a.up.bias.abs().max() == 0


def test_trainable_counts_equal_the_analytic_count_and_the_official_vit_b16_figures():
    import timm

    model = tm.timm_vit()  # 3 blocks of width 64
    apply_serial_adapter(model, bottleneck=8, train_norms=False)
    vleff.side.freeze_backbone(model, train_head=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == serial_adapter_num_parameters(3, 64, 8)
    assert serial_adapter_num_parameters(3, 64, 8) == 2 * 3 * (64 * 8 + 8 + 8 * 64 + 64)
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False)
    for m, norms, figure in ((64, False, 2_379_264), (64, True, 2_417_664), (8, False, 313_536)):
        apply_serial_adapter(vit_b, bottleneck=m, train_norms=norms)
        vleff.side.freeze_backbone(vit_b, train_head=False)
        assert sum(p.numel() for p in vit_b.parameters() if p.requires_grad) == figure  # METHODS-next.md
        remove_serial_adapter(vit_b)


def test_adapters_layer_norms_and_head_train_and_remove_restores_flags_and_keys():
    model = tm.timm_vit()
    model.blocks[0].attn.proj.bias.requires_grad_(False)  # a flag of the user's: kept through apply/remove
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_serial_adapter(model, bottleneck=2)
    assert serial_adapter_applied(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert trainable == (
        {n for n, _ in model.named_parameters() if n.startswith("vleff_serial_adapter.")}
        | {"head.weight", "head.bias"}
        | {f"{m}.{p}" for m in norms for p in ("weight", "bias")}
    )
    remove_serial_adapter(model)
    apply_serial_adapter(model, bottleneck=2, train_norms=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} - {"head.weight", "head.bias"} == {
        n for n, _ in model.named_parameters() if n.startswith("vleff_serial_adapter.")
    }
    remove_serial_adapter(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    with pytest.raises(ValueError, match="not applied"):
        remove_serial_adapter(model)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"bottleneck": 0}, "bottleneck=0"),
        ({"init_std": -1.0}, "init_std"),
        ({"train_norms": 1}, "train_norms"),
        ({"towers": "video"}, "towers"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SerialAdapterConfig.build(**bad)


def test_models_without_a_tower_are_refused():
    with pytest.raises(TypeError, match="supported"):
        apply_serial_adapter(torch.nn.Linear(3, 3))


def test_callback_fit_trains_adapters_norms_and_head_only(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    frozen = {
        k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head") and "norm" not in k
    }
    seen: list[torch.Tensor] = []

    class Watch(tl.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.model.vleff_serial_adapter.mlp[0].up.weight.detach().clone())
            assert not pl_module.model.blocks[0].training  # the frozen backbone in eval mode

    trainer = tl.trainer(tmp_path, [vleff.callbacks.SerialAdapter(bottleneck=4), Watch()], max_steps=4)
    trainer.fit(module, tl.loader(16))
    assert (module.model.vleff_serial_adapter.mlp[0].up.weight - seen[0]).abs().max() > 1e-4  # the adapters trained
    after = module.model.state_dict()
    for k, v in frozen.items():  # the backbone did not
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)
    assert SerialAdapterConfig().bottleneck == 64 and SerialAdapterConfig().train_norms  # the official defaults


def test_mixin_applies_and_freezes(tmp_path):
    from vleff.callbacks import SerialAdapterMixin

    class Module(SerialAdapterMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_serial_adapter(bottleneck=2)

    module = Module()
    up = module.model.vleff_serial_adapter.attention[0].up.weight
    assert serial_adapter_applied(module.model) and up.requires_grad
    assert not module.model.blocks[0].attn.qkv.weight.requires_grad
    tl.trainer(tmp_path, max_steps=2).fit(module, tl.loader(8))
    assert up.abs().max() > 0  # the adapters trained


def test_adapter_only_state_holds_the_trained_layer_norms_and_reproduces_the_model():
    """What trains beside the adapters (the LayerNorms) is in the adapter-only state, the frozen
    weights are not; loading it onto a fresh backbone gives the trained model back."""
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    fresh = tm.timm_vit().eval()
    fresh.load_state_dict(model.state_dict())
    apply_serial_adapter(model, bottleneck=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # "trained": adapters, norms and head moved
    state = vleff.side.side_state_dict(model)
    assert "blocks.0.norm1.weight" in state and "norm.bias" in state and "vleff_serial_adapter.mlp.0.up.weight" in state
    assert "blocks.0.attn.qkv.weight" not in state and "patch_embed.proj.weight" not in state
    apply_serial_adapter(fresh, bottleneck=3)
    vleff.side.load_side_state_dict(fresh, state)
    images = tm.images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), model(images), atol=0, rtol=0)
