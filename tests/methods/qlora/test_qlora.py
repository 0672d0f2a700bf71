"""QLoRA: the NF4 weight against a float64 round trip of the paper's levels, the start at the
quantised model, only LoRA trains, exact removal, refusals, measured bits per weight, a real fit
with an adapter-only checkpoint."""

from __future__ import annotations

import copy

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_checks import check_remove_restores_exactly
from torch import nn

import vleff
from vleff.methods.qlora import apply_qlora, qlora_parameters, qlora_weight_bytes, remove_qlora
from vleff.methods.qlora.nf4 import NF4Linear

C = 64  # the tiny towers' width
S = 64  # double-quantisation block the tiny towers allow (their 64 x 64 weights are 64 NF4 blocks)

#: NF4's 16 levels as the QLoRA paper's code (bitsandbytes) lists them: quantiles of N(0, 1) scaled to [-1, 1]
PAPER_NF4 = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float64,
)  # fmt: skip


def nf4_round_trip_float64(w: torch.Tensor, block: int, scaler_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dequantised weight, distance of each scaled entry to the nearest code boundary)`` in float64:
    absmax per ``block``, nearest paper level; the absmax constants minus their mean, symmetric 8-bit
    codes (scale 128 / absmax) per ``scaler_block``."""
    x = w.double().reshape(-1, block)
    absmax = x.abs().amax(dim=1)
    scaled = x / absmax[:, None]
    codes = (scaled[..., None] - PAPER_NF4).abs().argmin(dim=-1)
    mids = (PAPER_NF4[1:] + PAPER_NF4[:-1]) / 2
    margin = (scaled[..., None] - mids).abs().amin(dim=-1)
    centred = (absmax - absmax.mean()).reshape(-1, scaler_block)
    factor = 128 / centred.abs().amax(dim=1, keepdim=True)
    dq_absmax = ((centred * factor).round().clamp(-128, 127) / factor).reshape(-1) + absmax.mean()
    return (PAPER_NF4[codes] * dq_absmax[:, None]).reshape(w.shape), margin.reshape(w.shape)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.sampled_from([2, 4, 8]),
    scaler_block=st.sampled_from([4, 8, 16]),
    scale=st.floats(1e-3, 1e2),
)
def test_nf4_weight_is_the_papers_round_trip_in_float64(seed, rows, scaler_block, scale):
    g = torch.Generator().manual_seed(seed)
    cols = 64 * scaler_block
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(rows, cols, generator=g) * scale)
    ours = NF4Linear(layer, 64, scaler_block).dequantized().double()
    ref, margin = nf4_round_trip_float64(layer.weight.detach(), 64, scaler_block)
    clear = (
        margin > 1e-4
    )  # torchao lists the levels to 4 decimals: entries this close to a boundary may round either way
    assert clear.float().mean() > 0.99
    amax = layer.weight.detach().double().abs().amax()
    torch.testing.assert_close(ours[clear], ref[clear], atol=1e-4 * float(amax), rtol=1e-5)


def test_storage_is_4_127_bits_per_weight_with_double_quantisation():
    """Measured bytes against the paper's count: 4 + 8/64 + 32/(64·256) bits, plus the per-tensor mean."""
    layer = NF4Linear(nn.Linear(1024, 256), 64, 256)
    n = 1024 * 256
    expected_bytes = n // 2 + n // 64 + 4 * (n // (64 * 256)) + 4
    from vleff.methods.qlora.nf4 import nf4_storage_bytes

    assert nf4_storage_bytes(layer) - 16 * 4 == expected_bytes  # minus the 16-level table
    assert abs(8 * expected_bytes / n - 4.127) < 1e-3


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_qlora_starts_at_the_quantised_model_and_counts_its_parameters(family):
    torch.manual_seed(0)
    model = (tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()).eval()
    reference = copy.deepcopy(model)
    apply_qlora(model, r=2, scaler_block_size=S)
    names = vleff.methods.qlora.qlora_targets(reference)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:  # the same model with each target weight replaced by its dequantised NF4 value
            ref_layer = dict(reference.named_modules())[name]
            assert isinstance(modules[name].base_layer, NF4Linear)
            ref_layer.weight.copy_(modules[name].base_layer.dequantized())
        if family == "timm_vit":
            x = tm.images()
            torch.testing.assert_close(model(x), reference(x), atol=2e-4, rtol=1e-3)
        else:
            ids = tm.token_ids()
            torch.testing.assert_close(
                model.get_text_features(input_ids=ids), reference.get_text_features(input_ids=ids), atol=2e-4, rtol=1e-3
            )
    # every Linear of every block: timm qkv (3C x C), proj (C x C), fc1 (4C x C), fc2 (C x 4C) in 3 blocks;
    # HF CLIP q/k/v/out (C x C) and fc1/fc2 (C x 4C, 4C x C at intermediate 4C) in 2 + 2 blocks
    r = 2
    if family == "timm_vit":
        per_block = r * (C + 3 * C) + r * (2 * C) + 2 * r * (C + 4 * C)
        expected = 3 * per_block
    else:
        inter = model.config.text_config.intermediate_size
        per_block = 4 * r * (2 * C) + 2 * r * (C + inter)
        expected = 4 * per_block
    assert sum(p.numel() for p in qlora_parameters(model)) == expected


def test_only_lora_trains_and_the_4_bit_base_does_not_move():
    torch.manual_seed(0)
    model = tm.timm_vit()
    apply_qlora(model, r=2, scaler_block_size=S, train_head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(tm.images()).square().mean().backward()
        opt.step()
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert not torch.equal(model.blocks[0].attn.qkv.lora_B["default"].weight, torch.zeros(3 * C, 2))


@pytest.mark.parametrize("family", ["timm_vit", "hf_clip"])
def test_qlora_remove_restores_the_fp32_weights_exactly(family):
    def perturb(model):
        for p in qlora_parameters(model):
            p.normal_()

    check_remove_restores_exactly(family, lambda m: apply_qlora(m, r=2, scaler_block_size=S), remove_qlora, perturb)


def test_without_keep_original_removal_gives_the_4_bit_weights_back_and_saves_their_bytes():
    torch.manual_seed(0)
    model = tm.timm_vit()
    before = {n: (p.requires_grad, p.shape) for n, p in model.named_parameters()}
    kept = apply_qlora(copy.deepcopy(model), r=2, scaler_block_size=S)
    apply_qlora(model, r=2, scaler_block_size=S, keep_original=False)
    dropped = qlora_weight_bytes(model)
    assert dropped["kept_bytes"] == 0 and qlora_weight_bytes(kept)["kept_bytes"] == dropped["fp32_bytes"]
    quantised = model.blocks[0].mlp.fc1.base_layer.dequantized()
    remove_qlora(model)
    assert {n: (p.requires_grad, p.shape) for n, p in model.named_parameters()} == before
    assert torch.equal(model.blocks[0].mlp.fc1.weight, quantised)


def test_qlora_refusals_name_the_setting_the_layer_and_the_tower():
    with pytest.raises(ValueError, match="block_size=63"):
        vleff.callbacks.QLoRA(block_size=63)
    model = tm.timm_vit()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.weight has 12288 entries.*scaler_block_size=256"):
        apply_qlora(model, r=2)
    assert list(model.state_dict()) == keys and not vleff.get_method("qlora").is_applied(model)
    with pytest.raises(TypeError, match=r"QLoRA does not support open_clip.*bare parameters"):
        apply_qlora(tm.open_clip_model(), r=2, scaler_block_size=S)
    with pytest.raises(TypeError, match="QLoRA does not support"):
        apply_qlora(tm.hf_blip_retrieval(), r=2, scaler_block_size=S)


def test_missing_backend_says_what_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(ImportError, match=r"pip install torchao"):
        apply_qlora(tm.timm_vit(), r=2, scaler_block_size=S)


def test_qlora_callback_fits_and_saves_the_adapters(tmp_path):
    torch.manual_seed(1)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.QLoRA(r=2, scaler_block_size=S)], max_steps=3)
    trainer.fit(module, tl.loader(8))
    qkv = module.model.blocks[0].attn.qkv
    assert isinstance(qkv.base_layer, NF4Linear)
    assert not torch.equal(qkv.lora_B["default"].weight, torch.zeros_like(qkv.lora_B["default"].weight))
    trainer.save_checkpoint(tmp_path / "qlora.ckpt")
    saved = torch.load(tmp_path / "qlora.ckpt", weights_only=False)
    assert saved["vleff_methods"][0]["method"] == "qlora"
    assert any("lora_B" in k for k in saved["state_dict"])
    # adapter-only: the 4-bit base (NF4 codes and scales, rebuilt by applying QLoRA to the base
    # model) is left out like the frozen base parameters; what trains is all there
    trained = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
    assert trained <= set(saved["state_dict"])
    assert not [k for k in saved["state_dict"] if "nf4_" in k or ".base_layer." in k]
    # and it restores the trained model on a fresh module built as the first was
    torch.manual_seed(1)
    fresh = tl.TinyClassifier()
    vleff.apply_qlora(fresh.model, r=2, scaler_block_size=S)
    fresh.load_state_dict(saved["state_dict"], strict=False)
    x = torch.randn(2, 3, 32, 32)
    module.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), module(x), atol=0, rtol=0)
