"""LoRA through peft: exact at initialisation on every supported tower, only the adapters train
(counted analytically), the backbone does not move, the Lightning callback, clear refusals."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from families import FAMILIES
from vleff.side.lora import apply_lora, lora_parameters

import vleff

CASES = [
    ("timm_vit", "image"),
    ("open_clip", "image"),
    ("open_clip", "text"),
    ("hf_clip", "image"),
    ("hf_clip", "text"),
]


@pytest.mark.parametrize("family, tower", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_lora_starts_at_the_model_trains_only_the_adapters_and_reaches_the_output(family, tower):
    torch.manual_seed(0)
    model = FAMILIES[family].make().eval()
    fwd = FAMILIES[family].forwards[tower]
    with torch.no_grad():
        ref = fwd(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, r=4)
    with torch.no_grad():
        # B = 0. open_clip: exact up to nn.MultiheadAttention's own fast path, which torch takes in eval
        # once no MHA weight requires grad (the frozen base), and not for the reference
        tol = 1e-5 if family == "open_clip" else 0.0
        torch.testing.assert_close(fwd(model), ref, atol=tol, rtol=tol)
    c, blocks = 64, (3 if family == "timm_vit" else 4)  # timm: 3 blocks; CLIP: 2 + 2 (both towers)
    per_block = 4 * (c + 3 * c) if family != "hf_clip" else 3 * 4 * (c + c)  # fused qkv, or q/k/v each
    assert sum(p.numel() for p in lora_parameters(model)) == blocks * per_block
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        fwd(model).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(fwd(model), ref, atol=1e-5)
    after = dict(model.named_parameters())
    base = {n: p for n, p in after.items() if "lora_" not in n and not n.startswith("head.")}
    assert len(base) == sum(1 for n in before if not n.startswith("head."))
    for name, p in base.items():  # peft renames wrapped weights ...base_layer...; the values did not move
        torch.testing.assert_close(p, before[name.replace("base_layer.", "")], atol=0, rtol=0)


def test_lora_callback_trains_only_the_adapters(tmp_path):
    torch.manual_seed(1)
    trained = tl.TinyClassifier().state_dict()  # "trained" weights, loaded by init_from before peft wraps
    torch.save(trained, tmp_path / "trained.pt")
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.LoRA(r=2, init_from=tmp_path / "trained.pt")], max_steps=2)
    trainer.fit(module, tl.loader(8))
    assert lora_parameters(module) and all(p.requires_grad for p in lora_parameters(module))
    assert not any(p.requires_grad for n, p in module.named_parameters() if "blocks" in n and "lora_" not in n)
    assert torch.equal(module.model.blocks[1].attn.qkv.base_layer.weight, trained["model.blocks.1.attn.qkv.weight"])


def test_lora_refusals():
    with pytest.raises(ValueError, match="r=0"):
        vleff.callbacks.LoRA(r=0)
    with pytest.raises(TypeError, match="no supported"):
        apply_lora(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="LoRA does not support"):
        apply_lora(tm.hf_blip_retrieval())
    model = tm.open_clip_model()
    vleff.apply_tome(model, r=1)
    with pytest.raises(ValueError, match="cannot apply lora while tome.*in_proj_weight"):
        apply_lora(model)


def test_lora_stacks_with_a_vleff_token_method_on_timm():
    """timm's adapter calls ``attn.qkv`` as a module, so peft's LoRA layer runs inside vleff's
    generic block: the adapter's contribution is the same with and without the tower hook."""
    torch.manual_seed(0)
    model = tm.timm_vit().eval()
    apply_lora(model, r=2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
        ref = model(tm.images())
        vleff.apply_tome(model, r=0)  # no-op ToMe: the generic block path
        torch.testing.assert_close(model(tm.images()), ref, atol=1e-5, rtol=1e-5)


def _fit(tmp_path, max_steps, ckpt=None, save=None):
    torch.manual_seed(0)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.LoRA(r=2)], max_steps=max_steps, max_epochs=-1)
    trainer.fit(module, tl.loader(4, seed=1), ckpt_path=ckpt)  # one batch per epoch (as the conformance suite)
    if save:
        trainer.save_checkpoint(save)
    return module


def test_lora_callback_fit_saved_and_resumed_equals_uninterrupted(tmp_path):
    straight = _fit(tmp_path, 4)
    ckpt = str(tmp_path / "half.ckpt")
    _fit(tmp_path, 2, save=ckpt)
    resumed = _fit(tmp_path, 4, ckpt=ckpt)
    assert set(straight.state_dict()) == set(resumed.state_dict())
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)
    assert not torch.equal(
        straight.model.blocks[0].attn.qkv.lora_B["default"].weight,
        torch.zeros_like(straight.model.blocks[0].attn.qkv.lora_B["default"].weight),
    )


def test_lora_mixin_applies_in_init_and_remove_gives_back_the_library_module():
    """``use_lora`` in ``__init__``: the adapters exist before any checkpoint loads, only they and
    the head train; ``remove_lora`` gives back the very ``nn.Linear`` peft wrapped."""
    from vleff.callbacks import LoRAMixin

    class Module(LoRAMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_lora(r=2, alpha=4.0)

    torch.manual_seed(0)
    module = Module()
    qkv = module.model.blocks[0].attn.qkv.base_layer
    assert module.model.blocks[0].attn.qkv.scaling["default"] == 2.0  # alpha / r
    assert {
        n.split(".")[-3] if "lora_" in n else n.split(".")[1] for n, p in module.named_parameters() if p.requires_grad
    } == {"lora_A", "lora_B", "head"}
    vleff.remove_lora(module)
    assert module.model.blocks[0].attn.qkv is qkv and type(qkv) is torch.nn.Linear
    assert all(p.requires_grad for p in module.parameters())
