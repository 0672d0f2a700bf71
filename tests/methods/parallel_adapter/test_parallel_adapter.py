"""Parallel adapter (He et al. 2022) / AdaptFormer (2022): against a plain-PyTorch timm ViT with the
adapter written out (float64, the same weights; the adapter reading the stream before ``norm2`` as
AdaptFormer, or the MLP's input as He et al.), counts against the analytic formula and the ViT-B/16
figures of METHODS-next, dropout only in training, what trains, exact removal, settings, and real
Lightning fits. The shared bottleneck guarantees are in ``tests/methods/side/test_bottleneck.py``."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F

import vleff
from vleff.methods.parallel_adapter.core import (
    ParallelAdapterConfig,
    apply_parallel_adapter,
    parallel_adapter_applied,
    parallel_adapter_num_parameters,
    parallel_adapter_parameters,
    remove_parallel_adapter,
)


def _timm_reference(model, images: torch.Tensor, w: dict[str, torch.Tensor], s: float, reads: str) -> torch.Tensor:
    """``x + attn(norm1(x))``, then ``x + mlp(norm2(x)) + s·U·ReLU(D·x')`` (``x'``: ``x`` or ``norm2(x)``)."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    for i, blk in enumerate(model.blocks):
        d_w, d_b, u_w, u_b = (
            w[f"vleff_parallel_adapter.mlp.{i}.{p}"] for p in ("down.weight", "down.bias", "up.weight", "up.bias")
        )
        x = x + blk.ls1(blk.attn(blk.norm1(x)))
        src = x if reads == "stream" else blk.norm2(x)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)) + s * (F.relu(src @ d_w.T + d_b) @ u_w.T + u_b))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("reads, scale", [("stream", 0.1), ("mlp_input", 4.0)])
def test_parallel_adapter_equals_the_reference_forward_on_timm_float64(reads, scale):
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    images = tm.images().double()
    apply_parallel_adapter(model, bottleneck=5, scale=scale, reads=reads)
    with torch.no_grad():
        for p in parallel_adapter_parameters(model):
            p.normal_(0, 0.2)
        w = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("vleff_parallel_adapter.")}
        out = model(images)
        remove_parallel_adapter(model)
        ref = _timm_reference(model, images, w, scale, reads)
        other = _timm_reference(model, images, w, scale, "mlp_input" if reads == "stream" else "stream")
    assert (ref - other).abs().max() > 1e-3  # what the adapter reads matters
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_init_is_lora_style_and_the_defaults_are_adaptformers():
    torch.manual_seed(0)
    model = tm.timm_vit()
    apply_parallel_adapter(model)
    a = model.vleff_parallel_adapter.mlp[0]
    bound = 1 / model.embed_dim**0.5  # nn.Linear's Kaiming-uniform with a = √5: ±1/√fan_in
    assert a.down.weight.abs().max() <= bound and a.down.weight.abs().max() > 0.8 * bound
    assert a.up.weight.abs().max() == 0 and a.down.bias.abs().max() == 0 and a.up.bias.abs().max() == 0
    cfg = ParallelAdapterConfig()
    assert (cfg.bottleneck, cfg.scale, cfg.dropout, cfg.reads, cfg.train_norms) == (64, 0.1, 0.1, "stream", False)


def test_trainable_counts_equal_the_analytic_count_and_the_vit_b16_figures():
    import timm

    model = tm.timm_vit()
    apply_parallel_adapter(model, bottleneck=8)
    vleff.side.freeze_backbone(model, train_head=False)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == parallel_adapter_num_parameters(3, 64, 8)
    assert parallel_adapter_num_parameters(3, 64, 8) == 3 * (64 * 8 + 8 + 8 * 64 + 64)
    with torch.device("meta"):
        vit_b = timm.create_model("vit_base_patch16_224", pretrained=False)
    for m, figure in ((64, 1_189_632), (512, 9_452_544)):  # AdaptFormer; He et al.'s FFN adapter
        apply_parallel_adapter(vit_b, bottleneck=m)
        vleff.side.freeze_backbone(vit_b, train_head=False)
        assert sum(p.numel() for p in vit_b.parameters() if p.requires_grad) == figure  # METHODS-next.md
        remove_parallel_adapter(vit_b)


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = tm.timm_vit()
    apply_parallel_adapter(model, dropout=0.5)
    with torch.no_grad():
        for p in parallel_adapter_parameters(model):
            p.normal_(0, 0.2)
    images = tm.images()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images), model(images))
        model.vleff_parallel_adapter.train()
        assert not torch.equal(model(images), model(images))


def test_adapters_and_head_train_and_remove_restores_flags_and_keys():
    model = tm.timm_vit()
    model.blocks[0].attn.proj.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_parallel_adapter(model, bottleneck=2)
    assert parallel_adapter_applied(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if n.startswith("vleff_parallel_adapter.")
    } | {"head.weight", "head.bias"}
    remove_parallel_adapter(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"bottleneck": 0}, "bottleneck=0"),
        ({"scale": float("inf")}, "scale"),
        ({"dropout": 1.0}, "dropout"),
        ({"reads": "output"}, "reads"),
        ({"towers": "video"}, "towers"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        ParallelAdapterConfig.build(**bad)


def test_callback_fit_trains_only_the_adapters_and_head(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    frozen = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head")}
    trainer = tl.trainer(tmp_path, [vleff.callbacks.ParallelAdapter(bottleneck=4)], max_steps=4)
    trainer.fit(module, tl.loader(16))
    up = module.model.vleff_parallel_adapter.mlp[0].up.weight
    assert up.abs().max() > 1e-4  # the adapters trained from their zero start
    after = module.model.state_dict()
    for k, v in frozen.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)


def test_mixin_applies_and_freezes(tmp_path):
    from vleff.callbacks import ParallelAdapterMixin

    class Module(ParallelAdapterMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_parallel_adapter(bottleneck=2)

    module = Module()
    up = module.model.vleff_parallel_adapter.mlp[0].up.weight
    assert parallel_adapter_applied(module.model) and up.requires_grad
    assert not module.model.blocks[0].mlp.fc1.weight.requires_grad
    tl.trainer(tmp_path, max_steps=2).fit(module, tl.loader(8))
    assert up.abs().max() > 0
