"""VPT-deep: against its reference's forward (prompt tokens inserted after the class token and
overwritten before every block, dropped before the final norm), written out here in float64; its
init, counts, dropout, settings, and a real Lightning fit. The guarantees every prompt method
shares (causal text towers, padding, re-entrant checkpointing) are in ``tests/methods/side/test_prompts.py``."""

from __future__ import annotations

import math

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch

import vleff
from vleff.methods.vpt.core import VPTConfig, apply_vpt, remove_vpt, vpt_applied, vpt_num_parameters, vpt_parameters


def _timm_reference(model, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """KMnP/vpt's ``PromptedTransformer`` forward on a timm ViT: block 0's prompts inserted after the
    class token, every later block's prompts overwrite the slots, the slots dropped at the end."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    n = prompts.shape[1]
    for i, blk in enumerate(model.blocks):
        rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
        x = blk(torch.cat([x[:, :1], prompts[i][None].expand(x.shape[0], -1, -1), rest], dim=1))
    x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
    return model.forward_head(model.norm(x))


def test_vpt_equals_the_reference_forward_on_timm_float64():
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    images = tm.images().double()
    with torch.no_grad():
        plain = model(images)
        apply_vpt(model, num_tokens=4)
        prompts = model.vleff_vpt.prompts.detach().clone()
        out = model(images)
        remove_vpt(model)
        ref = _timm_reference(model, images, prompts)
    assert (ref - plain).abs().max() > 1e-3  # the prompts act ...
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)  # ... as the reference's inserted tokens


def _open_clip_reference(model, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The same on open_clip's image tower (sequence-first blocks, ``ln_pre``, cls pooling, ``proj``)."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype), x], dim=1) + v.positional_embedding
    x = v.ln_pre(v.patch_dropout(x))
    n = prompts.shape[1]
    first = v.transformer.resblocks[0]
    batch_first = getattr(v.transformer, "batch_first", True)
    for i, blk in enumerate(v.transformer.resblocks):
        rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
        x = torch.cat([x[:, :1], prompts[i][None].expand(x.shape[0], -1, -1), rest], dim=1)
        x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
    del first
    x = v.ln_post(x[:, 0])
    return x @ v.proj


def test_vpt_equals_the_reference_forward_on_open_clip_float64():
    torch.manual_seed(0)
    model = tm.open_clip_model().double().eval()
    images = tm.images().double()
    with torch.no_grad():
        apply_vpt(model, num_tokens=3)
        prompts = model.visual.vleff_vpt.prompts.detach().clone()
        out = model.encode_image(images)
        remove_vpt(model)
        ref = _open_clip_reference(model, images, prompts)
        plain = model.encode_image(images)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_init_is_the_references_uniform_bound():
    """±√(6 / (3·p·p + C)): on the tiny ViT (patch 8, width 64) √(6/256); ViT-B/16's ±0.0625."""
    model = tm.timm_vit()
    apply_vpt(model, num_tokens=50)
    bound = math.sqrt(6 / (3 * tm.PATCH * tm.PATCH + 64))
    p = model.vleff_vpt.prompts
    p = p.detach()
    assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.9 * bound
    assert abs(float(p.mean())) < 0.05 * bound  # centred
    assert math.isclose(math.sqrt(6 / (3 * 16 * 16 + 768)), 0.0625)


@pytest.mark.parametrize("family, depths", [("timm", (3,)), ("open_clip", (2, 2)), ("hf_clip", (2, 2))])
def test_trainable_counts_are_depth_times_n_times_width(family, depths):
    model = {"timm": tm.timm_vit, "open_clip": tm.open_clip_model, "hf_clip": tm.hf_clip_model}[family]()
    apply_vpt(model, num_tokens=7, towers="image" if family == "timm" else "all")
    widths = {"timm": (64,), "open_clip": (64, 64), "hf_clip": (64, 64)}[family]
    analytic = sum(vpt_num_parameters(d, 7, w) for d, w in zip(depths, widths, strict=True))
    assert sum(p.numel() for p in vpt_parameters(model)) == analytic
    head = sum(p.numel() for p in model.head.parameters()) if family == "timm" else 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == analytic + head
    assert vpt_num_parameters(12, 10, 768) == 92_160 and vpt_num_parameters(12, 50, 768) == 460_800


def test_prompt_dropout_draws_a_mask_per_sample_in_training_only():
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    apply_vpt(model, num_tokens=4, dropout=0.5)
    x = tm.images(1).expand(2, -1, -1, -1)  # the same image twice
    with torch.no_grad():
        a = model(x)
        assert torch.equal(a[0], a[1])  # eval: no dropout
        model.vleff_vpt.train()
        b = model(x)
    assert (b[0] - b[1]).abs().max() > 1e-4  # each sample its own mask


def test_backbone_frozen_prompts_and_head_train_and_remove_restores_flags():
    model = tm.timm_vit()
    model.blocks[0].norm1.weight.requires_grad_(False)  # a flag of the user's: kept through apply/remove
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_vpt(model, num_tokens=2)
    assert vpt_applied(model)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "head.bias",
        "head.weight",
        "vleff_vpt.prompts",
    ]
    remove_vpt(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "bad, match",
    [({"num_tokens": 0}, "num_tokens=0"), ({"dropout": -0.1}, "dropout"), ({"towers": "video"}, "towers")],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        VPTConfig.build(**bad)


def test_models_without_a_tower_are_refused():
    with pytest.raises(TypeError, match="supported"):
        apply_vpt(torch.nn.Linear(3, 3))


def test_callback_fit_trains_only_the_prompts_and_head(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    backbone = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head")}
    seen: list[torch.Tensor] = []

    class Watch(tl.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.model.vleff_vpt.prompts.detach().clone())
            assert not pl_module.model.blocks[0].training  # the frozen backbone in eval, as the reference

    trainer = tl.trainer(tmp_path, [vleff.callbacks.VPT(num_tokens=2), Watch()], max_steps=4)
    trainer.fit(module, tl.loader(16))
    assert (module.model.vleff_vpt.prompts - seen[0]).abs().max() > 1e-4  # the prompts trained
    after = module.model.state_dict()
    for k, v in backbone.items():  # the backbone did not
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)
    assert VPTConfig().num_tokens == 5  # the reference config's default


def test_mixin_applies_and_freezes(tmp_path):
    from vleff.callbacks import VPTMixin

    class Module(VPTMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_vpt(num_tokens=2)

    module = Module()
    assert vpt_applied(module.model) and module.model.vleff_vpt.prompts.requires_grad
    assert not module.model.blocks[0].attn.qkv.weight.requires_grad
    before = module.model.vleff_vpt.prompts.detach().clone()
    tl.trainer(tmp_path, max_steps=2).fit(module, tl.loader(8))
    assert (module.model.vleff_vpt.prompts - before).abs().max() > 0  # the prompts trained
