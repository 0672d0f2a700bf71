"""What both bottleneck-adapter methods (``vleff.side.bottleneck``: the serial adapter, the parallel
adapter / AdaptFormer) guarantee: the bottleneck is its formula; the adapted model starts exactly at
the frozen model on every family tower (1e-6 in fp32, bit-equal in float64); the zero up-projection
still lets the down-projection learn (zeroing both would not: the trap of KMnP/vpt's baseline);
BLIP's post-norm text layers are adapted where the official code puts adapters (checked with plain
torch hooks on the unpatched model); applying an adapter leaves another applied method's trainable
parameters trainable."""

from __future__ import annotations

import families as fam
import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.registry import get_method
from vleff.side.bottleneck import Bottleneck, bottleneck_num_parameters

ADAPTERS = {"serial_adapter": {"bottleneck": 4}, "parallel_adapter": {"bottleneck": 4, "dropout": 0.0}}


def _randomize_up(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_adapter." in name and ".up." in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


@settings(max_examples=20, deadline=None)
@given(
    dim=st.integers(1, 12),
    m=st.integers(1, 6),
    act=st.sampled_from(["gelu", "relu"]),
    std=st.one_of(st.none(), st.floats(1e-4, 1.0)),
)
def test_bottleneck_is_its_formula(dim, m, act, std):
    torch.manual_seed(0)
    b = Bottleneck(dim, m, act, down_std=std).double()
    assert b.up.weight.abs().max() == 0 and b.up.bias.abs().max() == 0 and b.down.bias.abs().max() == 0
    if std is not None:
        assert b.down.weight.abs().max() <= 2 * std  # truncated at two standard deviations
    x = torch.randn(3, dim, dtype=torch.float64)
    assert b(x).abs().max() == 0  # the exact start
    with torch.no_grad():
        b.up.weight.normal_()
        b.up.bias.normal_()
    nonlin = F.gelu if act == "gelu" else F.relu
    ref = nonlin(x @ b.down.weight.T + b.down.bias) @ b.up.weight.T + b.up.bias
    torch.testing.assert_close(b(x), ref, atol=1e-12, rtol=0)
    assert sum(p.numel() for p in b.parameters()) == bottleneck_num_parameters(dim, m)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@pytest.mark.parametrize("family, tower", fam.family_towers(("image", "text")))
def test_the_adapted_model_starts_exactly_at_the_frozen_model(name, family, tower):
    forward = fam.FAMILIES[family].forwards[tower]
    default = torch.get_default_dtype()
    try:
        # float64: bit-equal where the library's block is the generic block's own arithmetic (timm);
        # elsewhere the patched tower reorders a few sums of the library's own (open_clip's
        # nn.MultiheadAttention, Hugging Face), 1e-15 apart with or without an adapter; in float32 the
        # same reordering is a few ulps of outputs near 3 (1.2e-6 seen on open_clip's unequal towers)
        exact = 0.0 if family.startswith("timm") else 1e-12
        for dtype, atol, rtol in ((torch.float32, 1e-6, 1e-6), (torch.float64, exact, 0.0)):
            torch.set_default_dtype(dtype)  # the family's inputs in the model's dtype
            torch.manual_seed(0)
            model = fam.FAMILIES[family].make().to(dtype).eval()
            with torch.no_grad():
                plain = forward(model)
            get_method(name).apply(model, towers=tower, **ADAPTERS[name])
            with torch.no_grad():
                out = forward(model)
            torch.testing.assert_close(out, plain, atol=atol, rtol=rtol)
            _randomize_up(model)
            with torch.no_grad():
                assert (forward(model) - plain).abs().max() > 1e-4  # the adapters reach this tower's output
    finally:
        torch.set_default_dtype(default)


def _bert_reference_hooks(model, name: str, adapters) -> list:
    """The official places on BLIP's post-norm text layers, on the *unpatched* layers by plain torch
    hooks: serial on the self-attention output and on the FFN output (both after their dropout,
    before ``LayerNorm(x + ·)``); parallel beside the FFN, reading the FFN's input."""
    handles = []
    for i, layer in enumerate(model.text_encoder.encoder.layer):
        if name == "serial_adapter":
            a, f = adapters.attention[i], adapters.mlp[i]
            handles.append(layer.attention.output.dropout.register_forward_hook(lambda m, i_, o, a=a: o + a(o)))
            handles.append(layer.output.dropout.register_forward_hook(lambda m, i_, o, f=f: o + f(o)))
        else:
            f, s = adapters.mlp[i], adapters.scale
            seen: dict[int, torch.Tensor] = {}
            handles.append(
                layer.intermediate.register_forward_pre_hook(lambda m, a_, seen=seen: seen.__setitem__(0, a_[0]))
            )
            handles.append(
                layer.output.dropout.register_forward_hook(lambda m, i_, o, f=f, s=s, seen=seen: o + s * f(seen[0]))
            )
    return handles


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_blip_post_norm_text_layers_are_adapted_where_the_official_code_puts_adapters(name):
    import copy

    torch.manual_seed(0)
    model = tm.hf_blip_retrieval().double().eval()
    plain = copy.deepcopy(model)
    ids, mask = tm.blip_token_ids()
    image = tm.images().double()

    def run(m):
        with torch.no_grad():
            emb = m.vision_model(pixel_values=image).last_hidden_state
            return m.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=emb).last_hidden_state

    get_method(name).apply(model, towers="text", **ADAPTERS[name])
    _randomize_up(model)
    adapters = (
        model.text_encoder.vleff_serial_adapter
        if name == "serial_adapter"
        else model.text_encoder.vleff_parallel_adapter
    )
    handles = _bert_reference_hooks(plain, name, adapters)
    ref = run(plain)
    for h in handles:
        h.remove()
    assert (ref - run(plain)).abs().max() > 1e-4
    torch.testing.assert_close(run(model), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_the_down_projection_learns_from_the_second_step(name):
    """Only ``U`` starts at zero: step 1 moves ``U`` (its gradient is the hidden activation), step 2
    moves ``D``. With ``D`` zeroed too (the trap) ``D`` and ``U`` would never move."""
    for zero_down in (False, True):
        torch.manual_seed(0)
        model = tm.timm_vit()
        get_method(name).apply(model, **ADAPTERS[name])
        downs = [m.down for m in model.modules() if isinstance(m, Bottleneck)]
        ups = [m.up for m in model.modules() if isinstance(m, Bottleneck)]
        if zero_down:
            for d in downs:
                torch.nn.init.zeros_(d.weight)
        start = [d.weight.detach().clone() for d in downs]
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(tm.images()), torch.tensor([0, 1])).backward()
            opt.step()
        moved = max((d.weight - s).abs().max().item() for d, s in zip(downs, start, strict=True))
        up_moved = max(u.weight.abs().max().item() for u in ups)
        if zero_down:
            assert moved == 0 and up_moved == 0  # the trap: only the up-projection's bias learns
        else:
            assert moved > 0 and up_moved > 0


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_applying_an_adapter_keeps_another_methods_parameters_trainable(name):
    model = tm.timm_vit()
    get_method("vpt").apply(model, num_tokens=2)
    get_method(name).apply(model, **ADAPTERS[name])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "vleff_vpt.prompts" in trainable and any(n.startswith(f"vleff_{name}.") for n in trainable)
    get_method(name).remove(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "vleff_vpt.prompts",
        "head.weight",
        "head.bias",
    }


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_a_peft_tuner_is_refused_both_ways_rather_than_frozen(name):
    """Each would freeze what the other trains: refused, naming both, nothing changed."""
    import vleff

    model = tm.timm_vit()
    vleff.apply_lora(model, r=2)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"cannot apply {name} while lora is applied.*freezes"):
        get_method(name).apply(model, **ADAPTERS[name])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    vleff.remove_lora(model)
    get_method(name).apply(model, **ADAPTERS[name])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"cannot apply lora while {name} is applied"):
        vleff.apply_lora(model, r=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
