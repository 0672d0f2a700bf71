"""Prefix-tuning / P-tuning v2: against a plain-PyTorch timm ViT whose attention runs over the
concatenated keys ``[prefix, tokens]`` (P-tuning v2's table layout ``k_0, v_0, k_1, v_1, ...`` read by
hand), in float64; Li & Liang's reparameterisation; counts; dropout; settings; a real fit. Causal
text towers, padding and re-entrant checkpointing: ``tests/methods/side/test_prompts.py``."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch

import vleff
from vleff.methods.prefix.core import (
    PrefixConfig,
    apply_prefix,
    prefix_applied,
    prefix_num_parameters,
    prefix_parameters,
    remove_prefix,
)


def _reference(model, images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The timm ViT written out: block ``i`` attends over ``[K_i; k]``, ``[V_i; v]`` with
    ``K_i = table[:, 2iC:(2i+1)C]``, ``V_i = table[:, (2i+1)C:(2i+2)C]`` split into heads."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    b, n, c = x.shape
    for i, blk in enumerate(model.blocks):
        heads = blk.attn.num_heads
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        pk = table[:, 2 * i * c : (2 * i + 1) * c].reshape(-1, heads, c // heads).transpose(0, 1)
        pv = table[:, (2 * i + 1) * c : (2 * i + 2) * c].reshape(-1, heads, c // heads).transpose(0, 1)
        keys = torch.cat([pk[None].expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([pv[None].expand(b, -1, -1, -1), v], dim=2)
        probs = ((q * (c // heads) ** -0.5) @ keys.transpose(-2, -1)).softmax(-1)
        x = x + blk.attn.proj((probs @ values).transpose(1, 2).reshape(b, n, c))
        x = x + blk.mlp(blk.norm2(x))
    return model.forward_head(model.norm(x))


def test_prefix_equals_attention_over_concatenated_keys_float64():
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    images = tm.images().double()
    with torch.no_grad():
        plain = model(images)
        apply_prefix(model, num_tokens=3)
        table = model.vleff_prefix.table.detach().clone()
        out = model(images)
        ref = _reference(model, images, table)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_reparameterisation_is_the_mlp_over_the_embedding():
    """``projection=h``: block ``i``'s rows are the Li & Liang MLP's output columns of layer ``i``."""
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    images = tm.images().double()
    apply_prefix(model, num_tokens=2, projection=8)
    m = model.vleff_prefix
    with torch.no_grad():
        full = m.mlp_out(torch.tanh(m.mlp_in(m.embedding)))  # [P, 2·L·C], computed whole
        out = model(images)
        ref = _reference(model, images, full)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    loss = model(images).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in prefix_parameters(model))


@pytest.mark.parametrize("projection", [0, 8])
def test_trainable_counts_equal_the_analytic_count(projection):
    model = tm.open_clip_model(vision_layers=3, text_layers=2)
    apply_prefix(model, num_tokens=5, projection=projection, towers="all")
    analytic = prefix_num_parameters(3, 5, 64, projection) + prefix_num_parameters(2, 5, 64, projection)
    assert sum(p.numel() for p in prefix_parameters(model)) == analytic
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == analytic
    # METHODS-next's ViT-B/16 figures: length 10 direct 184,320; Li & Liang's MLP (h = 512) 9,857,024;
    # the CLIP text tower (12 blocks of 512) 122,880
    assert prefix_num_parameters(12, 10, 768) == 184_320
    assert prefix_num_parameters(12, 10, 768, 512) == 9_857_024
    assert prefix_num_parameters(12, 10, 512) == 122_880


def test_init_and_defaults_are_p_tuning_v2s():
    cfg = PrefixConfig()
    assert (cfg.num_tokens, cfg.dropout, cfg.projection) == (4, 0.1, 0)
    model = tm.timm_vit()
    apply_prefix(model, num_tokens=50)
    std = float(model.vleff_prefix.table.detach().std())
    assert 0.018 < std < 0.022  # N(0, 0.02²) over 50·2·3·64 values


def test_dropout_draws_a_mask_per_sample_in_training_only():
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    apply_prefix(model, num_tokens=4, dropout=0.5)
    model.vleff_prefix.table.data.normal_()  # large prefixes: dropout shows clearly
    x = tm.images(1).expand(2, -1, -1, -1)
    with torch.no_grad():
        a = model(x)
        assert torch.equal(a[0], a[1])
        model.vleff_prefix.train()
        b = model(x)
    assert (b[0] - b[1]).abs().max() > 1e-4


def test_remove_restores_flags_and_keys():
    model = tm.timm_vit()
    keys = set(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_prefix(model, num_tokens=2, projection=4)
    assert prefix_applied(model)
    assert set(model.state_dict()) - keys == {
        "vleff_prefix.embedding",
        "vleff_prefix.mlp_in.weight",
        "vleff_prefix.mlp_in.bias",
        "vleff_prefix.mlp_out.weight",
        "vleff_prefix.mlp_out.bias",
    }
    remove_prefix(model)
    assert set(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "bad, match",
    [({"num_tokens": 0}, "num_tokens=0"), ({"projection": -2}, "projection=-2"), ({"towers": "x"}, "towers")],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        PrefixConfig.build(**bad)


def test_callback_fit_trains_only_the_prefix_and_head(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    backbone = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head")}
    seen: list[torch.Tensor] = []

    class Watch(tl.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.model.vleff_prefix.table.detach().clone())

    trainer = tl.trainer(tmp_path, [vleff.callbacks.PrefixTuning(num_tokens=2), Watch()], max_steps=4)
    trainer.fit(module, tl.loader(16))
    assert (module.model.vleff_prefix.table - seen[0]).abs().max() > 1e-4
    after = module.model.state_dict()
    for k, v in backbone.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)
