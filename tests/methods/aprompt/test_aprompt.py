"""APrompt (E2VPT's released code followed): against a plain-PyTorch timm ViT written out as E2VPT
runs it — input prompts inserted after the class token and overwritten before every block (VPT-deep),
each head's key/value prompts appended to its keys and values — in float64; E2VPT's init; counts;
settings; a real fit. Causal text towers, padding and re-entrant checkpointing:
``tests/methods/side/test_prompts.py``."""

from __future__ import annotations

import math

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch

import vleff
from vleff.methods.aprompt.core import (
    APromptConfig,
    apply_aprompt,
    aprompt_num_parameters,
    aprompt_parameters,
    remove_aprompt,
)


def _reference(model, images: torch.Tensor, keys, values, prompts) -> torch.Tensor:
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    b, c = x.shape[0], x.shape[-1]
    n = 0 if prompts is None else prompts.shape[1]
    for i, blk in enumerate(model.blocks):
        if prompts is not None:  # VPT-deep: the slots overwritten by this block's prompts
            rest = x[:, 1:] if i == 0 else x[:, 1 + n :]
            x = torch.cat([x[:, :1], prompts[i][None].expand(b, -1, -1), rest], dim=1)
        heads, length = blk.attn.num_heads, x.shape[1]
        dh = c // heads
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(b, length, 3, heads, dh).permute(2, 0, 3, 1, 4)
        pk = keys[i].reshape(-1, heads, dh).transpose(0, 1)[None].expand(b, -1, -1, -1)
        pv = values[i].reshape(-1, heads, dh).transpose(0, 1)[None].expand(b, -1, -1, -1)
        k, v = torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)  # appended, as E2VPT
        probs = ((q * dh**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + blk.attn.proj((probs @ v).transpose(1, 2).reshape(b, length, c))
        x = x + blk.mlp(blk.norm2(x))
    if prompts is not None:
        x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("num_tokens", [0, 3])
def test_aprompt_equals_the_e2vpt_style_forward_float64(num_tokens):
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    images = tm.images().double()
    with torch.no_grad():
        plain = model(images)
        apply_aprompt(model, kv_tokens=4, num_tokens=num_tokens)
        m = model.vleff_aprompt
        keys, values = m.keys.detach().clone(), m.values.detach().clone()
        prompts = None if m.prompts is None else m.prompts.detach().clone()
        out = model(images)
        remove_aprompt(model)
        ref = _reference(model, images, keys, values, prompts)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_init_bounds_are_e2vpts_and_vpts():
    model = tm.timm_vit()
    apply_aprompt(model, kv_tokens=50, num_tokens=50)
    m = model.vleff_aprompt
    kv = math.sqrt(6 / (3 * tm.PATCH * tm.PATCH + 16))
    tokens = math.sqrt(6 / (3 * tm.PATCH * tm.PATCH + 64))
    for p, bound in ((m.keys, kv), (m.values, kv), (m.prompts, tokens)):
        top = float(p.detach().abs().max())
        assert 0.99 * bound < top <= bound  # 9,600 draws: the largest is within 1 % of the bound
    assert math.isclose(math.sqrt(6 / (3 * 16 * 16 + 16)), 0.08748177652797064)  # ViT-B/16


@pytest.mark.parametrize("num_tokens", [0, 3])
def test_trainable_counts_equal_the_analytic_count(num_tokens):
    model = tm.hf_clip_model()
    apply_aprompt(model, kv_tokens=5, num_tokens=num_tokens, towers="all")
    analytic = 2 * aprompt_num_parameters(2, 5, num_tokens, 64)
    assert sum(p.numel() for p in aprompt_parameters(model)) == analytic
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == analytic
    # METHODS-next: 10 key/value prompts per layer on ViT-B/16, 184,320; with 10 input prompts + 92,160
    assert aprompt_num_parameters(12, 10, 0, 768) == 184_320
    assert aprompt_num_parameters(12, 10, 10, 768) == 276_480


@pytest.mark.parametrize(
    "bad, match",
    [({"kv_tokens": 0}, "kv_tokens=0"), ({"num_tokens": -1}, "num_tokens=-1"), ({"dropout": 2}, "dropout")],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        APromptConfig.build(**bad)


def test_callback_fit_trains_only_the_prompts_and_head(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    backbone = {k: v.clone() for k, v in module.model.state_dict().items() if not k.startswith("head")}
    seen: list[torch.Tensor] = []

    class Watch(tl.pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(torch.cat([p.detach().flatten() for p in aprompt_parameters(pl_module.model)]))

    trainer = tl.trainer(tmp_path, [vleff.callbacks.APrompt(kv_tokens=2, num_tokens=2), Watch()], max_steps=4)
    trainer.fit(module, tl.loader(16))
    now = torch.cat([p.detach().flatten() for p in aprompt_parameters(module.model)])
    assert (now - seen[0]).abs().max() > 1e-4
    after = module.model.state_dict()
    for k, v in backbone.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)
