"""Reversible blocks: the custom backward equals autograd through the same couplings run plainly.

The reference network here is written from timm's own modules (``blk.attn``, ``blk.mlp``,
``blk.norm1`` ...), not from vleff's generic block, and keeps every activation; the reversible
stack must give the same output and the same gradients with dropout and drop-path on, which
only holds if the recomputation replays the forward's random numbers.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import warnings

import pytest
import tiny_models as tm
import torch
import vleff.memory.reversible as rev
from vleff.memory.reversible import ReversibleConfig, apply_reversible, remove_reversible, reversible_applied

from vleff.profile import saved_activation_bytes

DROPOUT = dict(attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2)


def _vit(depth: int = 3, dtype: torch.dtype = torch.float32, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return tm.timm_vit(depth=depth, **kwargs).to(dtype)


def _adapter(block: torch.nn.Module, key: str, x: torch.Tensor) -> torch.Tensor:
    """MEFT's bottleneck adapter written out with the block's adapter weights (0 if none)."""
    adapters = getattr(block, "vleff_reversible", None)
    if adapters is None:
        return torch.zeros_like(x)
    down, up = adapters[key].down, adapters[key].up
    return torch.nn.functional.linear(torch.nn.functional.gelu(x @ down.weight.T + down.bias), up.weight, up.bias)


def balance_reference(config: ReversibleConfig) -> tuple[float, float]:
    """``balance``'s stream scale 1/ρ and G's weight, from an eigendecomposition of the couplings'
    linear part (numerically, not the closed form the library uses)."""
    if not (config.balance and config.coupling == "meft"):
        return 1.0, 1.0
    m = torch.tensor([[config.lam, 1.0], [config.lam, 1.0 + config.beta]], dtype=torch.float64)
    values, vectors = torch.linalg.eig(m.T)  # left eigenvectors of m
    i = int(values.real.argmax())
    w = vectors[:, i].real
    return float(1 / values[i].real), float((w[0] + w[1]) / w[1])


def reference_forward(model: torch.nn.Module, x: torch.Tensor, config: ReversibleConfig) -> torch.Tensor:
    """timm's forward with the blocks replaced by the couplings (and MEFT's adapters, when the
    blocks have them), all activations kept."""
    lam, beta = (1.0, 1.0) if config.coupling == "revvit" else (config.lam, config.beta)
    res = config.coupling == "meft"
    c, gain = balance_reference(config)
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    x1 = x2 = h
    for blk in model.blocks:
        x1, x2 = c * x1, c * x2
        f = blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x2))))
        f = f + _adapter(blk, "f", f)
        y1 = lam * x1 + (x2 + f if res else f)
        n = blk.norm2(y1)
        g = blk.drop_path2(blk.ls2(blk.mlp(n) + _adapter(blk, "g", n)))
        y2 = beta * x2 + (y1 + gain * g if res else g)
        x1, x2 = y1, y2
    return model.forward_head(model.norm((x1 + x2) / 2))


def _grads(model: torch.nn.Module, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    out = run()
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _flat(grads: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in names])


# (settings, tolerance on the relative error of the whole gradient): MEFT's couplings amplify
# rounding error block after block (its streams are float64 by default, so 1e-5 holds here)
COUPLINGS = [
    (dict(coupling="revvit"), 1e-5),
    (dict(coupling="meft", adapter=0), 1e-5),
    (dict(coupling="meft"), 1e-5),
    (dict(coupling="meft", lam=0.5, beta=0.8), 1e-5),
    (dict(coupling="meft", balance=True), 1e-5),
    (dict(coupling="meft", lam=0.5, beta=0.8, balance=True), 1e-5),
    (dict(coupling="revvit", adapter=4), 1e-5),
]


@pytest.mark.parametrize(
    "settings, tol", COUPLINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()) if isinstance(s, dict) else str(s)
)
def test_gradients_equal_autograd_through_the_plain_couplings_with_dropout(settings, tol):
    model = _vit(depth=4, **DROPOUT).train()
    config = ReversibleConfig(**settings)
    x = tm.images()
    apply_reversible(model, config)  # first: MEFT's adapters are new parameters of the blocks
    ref_out, ref = _grads(model, lambda: reference_forward(model, x, config))
    out, got = _grads(model, lambda: model(x))
    assert _rel(out, ref_out) <= 1e-5
    assert set(got) == set(ref)
    assert _rel(_flat(got, ref), _flat(ref, ref)) <= tol
    assert max(_rel(got[n], ref[n]) for n in ref) <= 10 * tol  # every parameter, not only the big ones


def test_float64_gradients_equal_even_at_small_lambda_beta():
    """MEFT's λ = β = 0.1: right in float64 at depth 4 (in float32 it is not; apply warns)."""
    model = _vit(depth=4, dtype=torch.float64, **DROPOUT).train()
    config = ReversibleConfig(coupling="meft", lam=0.1, beta=0.1)
    x = tm.images().double()
    apply_reversible(model, config)
    _, ref = _grads(model, lambda: reference_forward(model, x, config))
    _, got = _grads(model, lambda: model(x))
    assert max(_rel(got[n], ref[n]) for n in ref) <= 1e-7


def test_meft_needs_float64_streams_at_depth_12():
    """MEFT's residual couplings amplify rounding error ~6.9x per block even at λ = β = 1: at
    depth 12 float32 streams give wrong gradients, float64 streams (the default) right ones,
    in a float32 model."""
    model = _vit(depth=12, embed_dim=32, num_heads=2).train()
    x = tm.images()
    errors = {}
    for streams, balance in (("float64", False), ("float32", False), ("float64", True)):
        config = ReversibleConfig(coupling="meft", streams=streams, balance=balance)
        apply_reversible(model, config)
        _, ref = _grads(model, lambda: reference_forward(model, x, config))
        _, got = _grads(model, lambda: model(x))
        errors[streams + "-balance" * balance] = _rel(_flat(got, ref), _flat(ref, ref))
        remove_reversible(model)
    # balance makes the branches count as in the plain network: their Jacobians amplify a little
    # more (measured 8e-7 against 1e-7 here), still far inside float64
    assert errors["float64"] <= 1e-4 and errors["float32"] > 1e-2 and errors["float64-balance"] <= 1e-4, errors


def test_amplification_estimate_and_warning():
    golden = (1 + 5**0.5) / 2
    assert rev.block_amplification(ReversibleConfig()) == pytest.approx(golden**4)  # [[1, 1], [1, 2]]
    assert rev.block_amplification(ReversibleConfig(coupling="revvit")) == 1.0
    deep = tm.timm_vit(depth=12, embed_dim=32, num_heads=2)
    for settings, warns in [
        ({}, False),
        ({"streams": "float32"}, True),
        ({"lam": 0.1, "beta": 0.1}, True),
        ({"coupling": "revvit"}, False),
        ({"balance": True}, True),
    ]:
        # (revvit with balance=True is refused now: tests/conformance/test_method_conflicts.py)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_reversible(deep, **settings)
        messages = [str(w.message) for w in caught]
        assert any("amplifies rounding error" in m or "balance=True over 12 blocks" in m for m in messages) == warns, (
            settings
        )


def test_without_rng_replay_the_gradients_are_wrong(monkeypatch):
    """The replay is what makes the previous test pass: recomputing with fresh random numbers
    draws other dropout masks and the gradients no longer match."""
    model = _vit(depth=4, **DROPOUT).train()
    config = ReversibleConfig(coupling="revvit")
    x = tm.images()
    _, ref = _grads(model, lambda: reference_forward(model, x, config))
    apply_reversible(model, config)
    monkeypatch.setattr(rev, "replay_rng", lambda state: contextlib.nullcontext())
    _, got = _grads(model, lambda: model(x))
    assert max(_rel(got[n], ref[n]) for n in ref) > 1e-2


def test_backward_leaves_the_global_rng_where_the_forward_left_it():
    model = apply_reversible(_vit(depth=3, **DROPOUT).train(), coupling="revvit")
    torch.manual_seed(5)
    out = model(tm.images())
    after_forward = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


def _sgd_run(seed: int) -> dict[str, torch.Tensor]:
    model = apply_reversible(_vit(depth=3, **DROPOUT).train(), coupling="meft")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tm.images()), torch.arange(2) % 10).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_two_runs_with_the_same_seed_give_identical_weights():
    a, b, c = _sgd_run(7), _sgd_run(7), _sgd_run(8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters: dropout is on


def _stack_bytes(depth: int, reversible: bool) -> int:
    model = _vit(depth=depth).train()
    if reversible:
        apply_reversible(model, coupling="revvit")
    h = model.norm_pre(model._pos_embed(model.patch_embed(tm.images()))).detach().requires_grad_(True)
    return saved_activation_bytes(lambda: model.blocks(h))


def test_saved_for_backward_bytes_do_not_grow_with_depth():
    rev2, rev6 = _stack_bytes(2, True), _stack_bytes(6, True)
    plain2, plain6 = _stack_bytes(2, False), _stack_bytes(6, False)
    assert rev6 <= 1.15 * rev2, (rev2, rev6)
    assert plain6 >= 2.5 * plain2, (plain2, plain6)
    assert rev6 < plain6 / 5


def test_bf16_autocast_gradients_close_to_fp32():
    x = tm.images()
    model = apply_reversible(_vit(depth=4).train(), coupling="meft", lam=0.5, beta=0.5)
    _, ref = _grads(model, lambda: model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, low = _grads(model, lambda: model(x).float())
    flat_ref = torch.cat([g.flatten() for g in ref.values()])
    flat_low = torch.cat([low[n].flatten() for n in ref])
    # bf16 keeps ~3 significant digits per op; over 4 blocks the gradient direction survives
    cos = torch.nn.functional.cosine_similarity(flat_low, flat_ref, dim=0)
    assert cos > 0.99, cos
    assert _rel(flat_low, flat_ref) < 0.1


def test_bf16_recomputation_reenters_autocast(monkeypatch):
    """With autocast dropped from the recomputation the local gradients come from fp32 branches
    while the forward ran bf16: reconstruction and gradients drift apart from autocast's own."""
    x = tm.images()
    model = apply_reversible(_vit(depth=4).train(), coupling="revvit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, ref = _grads(model, lambda: reference_forward(model, x, ReversibleConfig(coupling="revvit")).float())
        _, got = _grads(model, lambda: model(x).float())
    good = max(_rel(got[n], ref[n]) for n in ref)
    monkeypatch.setattr(rev, "_autocast_state", lambda device_type: (False, torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bad = _grads(model, lambda: model(x).float())
    worse = max(_rel(bad[n], ref[n]) for n in ref)
    assert good < 0.05 and worse > 2 * good, (good, worse)


def test_remove_restores_the_library_bit_exactly_and_copies_work():
    model = _vit(depth=3).eval()
    x = tm.images()
    with torch.no_grad():
        ref = model(x)
        keys = list(model.state_dict())
        apply_reversible(model, coupling="revvit")
        assert list(model.state_dict()) == keys
        out = model(x)
        assert not torch.allclose(out, ref)
        torch.testing.assert_close(
            out, reference_forward(model, x, ReversibleConfig(coupling="revvit")), atol=1e-6, rtol=1e-5
        )
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert reversible_applied(other)
            torch.testing.assert_close(other(x), out, atol=0, rtol=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), out, atol=0, rtol=0)
        remove_reversible(model)
        assert not reversible_applied(model)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        assert "forward" not in model.blocks.__dict__
        assert all(not b._forward_pre_hooks for b in model.blocks)
    with pytest.raises(ValueError, match="not applied"):
        remove_reversible(model)


def test_refusals():
    from vleff.tokens.tome import apply_tome

    for bad, match in [
        ({"coupling": "revnet"}, "coupling='revnet'.*meft"),
        ({"lam": 0}, "lam=0.*> 0"),
        ({"beta": -1.0}, "beta=-1.0"),
        ({"lam": float("nan")}, "lam=nan"),
        ({"balance": 1}, "balance=1.*True or False"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_reversible(_vit(), **bad)
    model = apply_tome(_vit(), r=1)
    with pytest.raises(ValueError, match="cannot apply reversible while tome is applied"):
        apply_reversible(model)
    with pytest.raises(ValueError, match="cannot apply tome while reversible is applied"):  # refused at apply
        apply_tome(apply_reversible(_vit()), r=1)
    model = _vit()
    model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        apply_reversible(model)
    model = apply_reversible(_vit())
    model.set_grad_checkpointing(True)  # turned on after: the library bypasses the stack
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model.train()(tm.images())
    with pytest.raises(TypeError, match="does not support.*supported: timm VisionTransformer"):
        apply_reversible(tm.hf_blip_retrieval())
    with pytest.raises(TypeError, match="towers='text'.*no text tower"):
        apply_reversible(_vit(), towers="text")
    model = apply_reversible(tm.open_clip_model())
    model.set_grad_checkpointing(True)  # open_clip checkpoints inside the forward the stack replaces
    with pytest.raises(RuntimeError, match="gradient checkpointing"):
        model.encode_text(tm.token_ids())


def test_batchnorm_in_a_branch_is_refused():
    model = _vit()
    model.blocks[1].mlp.norm = torch.nn.BatchNorm1d(4)
    with pytest.raises(ValueError, match="BatchNorm1d"):
        apply_reversible(model)


def test_callback_and_mixin_apply():
    import lightning.pytorch as pl

    from vleff.callbacks import Reversible, ReversibleMixin

    callback = Reversible(coupling="revvit")
    module = pl.LightningModule()
    module.net = _vit()
    callback.setup(None, module, "fit")  # type: ignore[arg-type]
    assert reversible_applied(module)
    with pytest.raises(ValueError, match="coupling"):
        Reversible(coupling="x")

    class Module(ReversibleMixin, pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _vit()
            self.use_reversible(coupling="meft", lam=0.3)

    assert rev.reversible_config(Module()).lam == 0.3


def test_rng_states_are_saved_only_for_blocks_that_draw_random_numbers():
    """A 5 KB CPU RNG state per branch call would grow with depth; blocks without dropout save none."""
    seen = []
    original = rev.capture_rng

    def counting(device):
        seen.append(device)
        return original(device)

    import unittest.mock

    with unittest.mock.patch.object(rev, "capture_rng", counting):
        apply_reversible(_vit(depth=3).train(), coupling="revvit")(tm.images()).sum().backward()
        assert seen == []
        apply_reversible(_vit(depth=3, drop_path_rate=0.1).train(), coupling="revvit")(tm.images()).sum()
        assert len(seen) == 2 * 2  # drop-path rates rise from 0: blocks 1 and 2 draw, block 0 does not


def reference_open_clip_stack(
    transformer: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, config: ReversibleConfig
) -> torch.Tensor:
    """open_clip's ``Transformer`` with the couplings, from its own block modules (``attention``
    is the library's ``nn.MultiheadAttention`` call, in the transformer's own layout)."""
    lam, beta = config.scales
    res = config.coupling == "meft"
    c, gain = balance_reference(config)
    seq_first = not transformer.batch_first
    x1 = x2 = x.transpose(0, 1) if seq_first else x
    for blk in transformer.resblocks:
        x1, x2 = c * x1, c * x2
        f = blk.ls_1(blk.attention(blk.ln_1(x2), attn_mask=mask))
        f = f + _adapter(blk, "f", f)
        y1 = lam * x1 + (x2 + f if res else f)
        n = blk.ln_2(y1)
        g = blk.ls_2(blk.mlp(n) + _adapter(blk, "g", n))
        y2 = beta * x2 + (y1 + gain * g if res else g)
        x1, x2 = y1, y2
    out = (x1 + x2) / 2
    return out.transpose(0, 1) if seq_first else out


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize(
    "settings",
    [dict(coupling="revvit"), dict(coupling="meft", lam=0.7, beta=0.9, balance=True)],
    ids=["revvit", "meft"],
)
def test_open_clip_towers_gradients_equal_the_reference(tower, settings):
    """Both open_clip towers; the text tower's causal mask must reach F (without it the text
    output attends to later tokens and differs from the reference)."""
    torch.manual_seed(0)
    model = tm.open_clip_model().train()
    config = ReversibleConfig(**settings, towers=tower)
    transformer = model.visual.transformer if tower == "image" else model.transformer
    mask = None if tower == "image" else model.attn_mask
    torch.manual_seed(1)
    x = torch.randn(2, 16, 64, requires_grad=True)

    def grads(run):
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters()}, x.grad.clone()

    apply_reversible(model, config)
    ref_out, ref, ref_x = grads(lambda: reference_open_clip_stack(transformer, x, mask, config))
    out, got, got_x = grads(lambda: transformer(x, attn_mask=mask))
    assert _rel(out, ref_out) <= 1e-5
    assert _rel(_flat(got, ref), _flat(ref, ref)) <= 1e-5 and _rel(got_x, ref_x) <= 1e-5
    with torch.no_grad():
        plain = model.encode_text(tm.token_ids()) if tower == "text" else model.encode_image(tm.images())
        remove_reversible(model)
        lib = model.encode_text(tm.token_ids()) if tower == "text" else model.encode_image(tm.images())
        assert not torch.allclose(plain, lib)


def test_combines_with_galore():
    """GaLore reads ordinary ``.grad``s, which the reversible backward delivers: it trains the
    reversible network. (Step-by-step equality with the plain-autograd network is not a fair
    check here: GaLore's rank-4 SVD subspace of a tiny model flips under 1e-6 gradient changes.)"""
    from vleff.methods.galore.convert import galore_from_optimizer

    model = apply_reversible(_vit(depth=3).train(), coupling="revvit")
    opt = galore_from_optimizer(torch.optim.AdamW(model.parameters(), lr=3e-3), model, rank=4, update_proj_gap=2)
    x, y = tm.images(), torch.arange(2) % 10
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert model.blocks[0].attn.qkv.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and losses == sorted(losses, reverse=True), losses


@pytest.mark.parametrize(
    "settings, streams",
    [
        (dict(coupling="meft", lam=0.5, beta=0.5), torch.float64),
        (dict(coupling="revvit"), torch.float32),
        (dict(coupling="meft", streams="float32"), torch.float32),
    ],
)
def test_bf16_model_keeps_high_precision_streams(settings, streams):
    """A model cast to bf16 (no autocast): branches run in bf16, the streams in float32 (RevNet)
    or float64 (MEFT, whose couplings amplify rounding error)."""
    model = apply_reversible(_vit(depth=3, dtype=torch.bfloat16).train(), **settings)
    seen = []
    original = rev.fuse
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rev, "fuse", lambda y1, y2, dtype: (seen.append(y1.dtype), original(y1, y2, dtype))[1])
        out = model(tm.images().bfloat16())
    assert out.dtype == torch.bfloat16 and seen == [streams]
    out.float().square().mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.blocks.parameters())


@pytest.mark.parametrize("tower", ["image", "text"])
def test_hf_clip_towers_gradients_equal_the_reference(tower):
    """Hugging Face CLIP: the encoder's own call (mask, ``is_causal``) is captured from the plain
    model and fed to a reference stack built from the library's layer modules."""
    torch.manual_seed(0)
    model = tm.hf_clip_model().train()
    encoder = (model.vision_model if tower == "image" else model.text_model).encoder
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        if args:
            captured["inputs_embeds"] = args[0]

    handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        if tower == "image":
            model.get_image_features(pixel_values=tm.images())
        else:
            model.get_text_features(input_ids=tm.token_ids())
    handle.remove()
    mask = captured.pop("attention_mask", None)
    extra = {k: v for k, v in captured.items() if k == "is_causal"}
    x = captured.pop("inputs_embeds").detach().clone().requires_grad_(True)
    config = ReversibleConfig(coupling="meft", lam=0.7, beta=0.9, towers=tower)

    def reference():
        x1 = x2 = x
        for layer in encoder.layers:
            f = layer.self_attn(hidden_states=layer.layer_norm1(x2), attention_mask=mask, **extra)[0]
            y1 = 0.7 * x1 + x2 + f + _adapter(layer, "f", f)
            n = layer.layer_norm2(y1)
            y2 = 0.9 * x2 + y1 + layer.mlp(n) + _adapter(layer, "g", n)
            x1, x2 = y1, y2
        return (x1 + x2) / 2

    def grads(run):
        model.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters()}, x.grad.clone()

    apply_reversible(model, config)
    ref_out, ref, ref_x = grads(reference)
    out, got, got_x = grads(lambda: encoder(inputs_embeds=x, attention_mask=mask, **extra).last_hidden_state)
    assert _rel(out, ref_out) <= 1e-5
    assert _rel(_flat(got, ref), _flat(ref, ref)) <= 1e-5 and _rel(got_x, ref_x) <= 1e-5


def test_clip_memory_rows_reversible_and_reversible_galore(tmp_path):
    """``vleff-bench memory`` rows for reversible towers (tiny CLIP): MEFT's adapters counted as
    parameters (analytic), AdamW state 8 bytes/parameter, less saved for backward than plain
    backprop; with GaLore less optimizer state."""
    import json

    from vleff.cli.training_memory import run_training_memory

    config = tmp_path / "tiny_clip.json"
    config.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "image_size": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 4, "layers": 2},
            }
        )
    )
    rows = run_training_memory(
        str(config), batch_size=4, rank=4, methods="adamw,reversible,reversible_galore", isolate=False
    )
    adamw, rev_adamw, rev_galore = rows
    adapters = 2 * 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)  # towers x blocks x (A_F, A_G) x (down + up)
    assert rev_adamw["parameters"] == adamw["parameters"] + adapters == rev_galore["parameters"]
    tensors = rev_adamw["parameter_tensors"]
    assert rev_adamw["optimizer_state_bytes"] == 8 * rev_adamw["parameters"] + 4 * tensors
    assert rev_adamw["grad_bytes"] == 4 * rev_adamw["parameters"]
    assert rev_galore["optimizer_state_bytes"] < rev_adamw["optimizer_state_bytes"]
    assert rev_adamw["saved_for_backward_bytes"] < adamw["saved_for_backward_bytes"]
    assert [r["name"] for r in rows[1:]] == ["reversible (MEFT) + AdamW", "reversible (MEFT) + GaLoreAdamW r=4"]


class _DropoutClassifier:
    """tiny_lightning's classifier with dropout and drop-path on (built lazily: Lightning import)."""

    @staticmethod
    def make():
        import tiny_lightning as tl

        module = tl.TinyClassifier()
        torch.manual_seed(0)
        module.model = tm.timm_vit(depth=3, **DROPOUT)
        return module


def _fit_dropout(tmp_path, max_steps: int, ckpt: str | None = None, save: str | None = None, adapter_seed: int = 5):
    import lightning.pytorch as pl
    import tiny_lightning as tl

    from vleff.callbacks import Reversible

    class Reseed(pl.Callback):  # Lightning checkpoints do not hold the global RNG
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            torch.manual_seed(1000 + trainer.global_step)

    torch.manual_seed(0)
    module = _DropoutClassifier.make()
    trainer = tl.trainer(
        tmp_path, [Reversible(coupling="meft", lam=0.8, beta=0.9), Reseed()], max_steps=max_steps, max_epochs=-1
    )
    torch.manual_seed(adapter_seed)  # MEFT's adapters are drawn in the callback's setup
    trainer.fit(module, tl.loader(4, seed=1), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return module


def test_callback_resumes_exactly_with_dropout_on(tmp_path):
    """Saved at step 2 and resumed to 4 equals 4 steps straight, with dropout and drop-path
    replayed in every backward (and MEFT's adapters restored from the checkpoint)."""
    straight = _fit_dropout(tmp_path, 4)
    ckpt = str(tmp_path / "half.ckpt")
    _fit_dropout(tmp_path, 2, save=ckpt)
    resumed = _fit_dropout(tmp_path, 4, ckpt=ckpt, adapter_seed=6)  # the checkpoint must overwrite them
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b) and any("vleff_reversible" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    fresh = _DropoutClassifier.make().state_dict()
    assert not torch.allclose(a["model.blocks.0.attn.qkv.weight"], fresh["model.blocks.0.attn.qkv.weight"])


def test_starting_gap_is_the_relative_output_difference_and_leaves_the_model_alone():
    model = _vit(depth=3).eval()
    x = tm.images()
    with torch.no_grad():
        ref = model(x)
        torch.manual_seed(3)
        rev_model = apply_reversible(copy.deepcopy(model), coupling="meft", lam=0.3, beta=0.3)
        want = float((rev_model(x) - ref).norm() / ref.norm())
    torch.manual_seed(3)  # the same adapters
    gap = rev.starting_gap(model, x, coupling="meft", lam=0.3, beta=0.3)
    assert gap == pytest.approx(want, rel=1e-6) and gap > 0
    assert not reversible_applied(model)
    torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    features = rev.starting_gap(model, x, forward=lambda m, inp: m.forward_features(inp), coupling="revvit")
    assert features > 0 and features != pytest.approx(gap)


def test_balance_starts_closer_to_the_plain_network():
    """At λ = β = 1 the streams grow 2.6x per block and drown the later blocks' branches;
    ``balance`` keeps the streams' scale and should start far closer (6 blocks, no adapters)."""
    model = _vit(depth=6).eval()
    x = tm.images()
    plain = rev.starting_gap(model, x, coupling="meft", adapter=0)
    balanced = rev.starting_gap(model, x, coupling="meft", adapter=0, balance=True)
    assert balanced < 0.5 * plain
    c, gain = ReversibleConfig(coupling="meft", balance=True).balance_factors
    assert (c, gain) == pytest.approx(balance_reference(ReversibleConfig(coupling="meft", balance=True)))
    assert (c, gain) == pytest.approx(
        (2 / (3 + 5**0.5), (1 + 5**0.5) / 2)
    )  # 1/φ², φ (ρ = φ², the golden ratio squared)
    assert ReversibleConfig(coupling="revvit").balance_factors == (1.0, 1.0)
    with pytest.raises(ValueError, match="coupling='revvit' takes no balance=True"):  # refused, not ignored
        ReversibleConfig(coupling="revvit", balance=True)


def _hf_tower_with_attention_dropout(p: float) -> tuple[torch.nn.Module, torch.Tensor]:
    """A float64 Hugging Face CLIP vision tower whose only randomness is the attention's dropout
    probability (a float, ``CLIPAttention.dropout`` = config ``attention_dropout``), and its input."""
    torch.manual_seed(0)
    model = tm.hf_clip_model().double().train()
    for layer in model.vision_model.encoder.layers:
        layer.self_attn.dropout = p
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return model, tm.images().double()


def _open_clip_with_mha_dropout(p: float) -> tuple[torch.nn.Module, torch.Tensor]:
    """A float64 open_clip model whose towers' ``nn.MultiheadAttention`` have ``dropout`` = p (a
    float, the only randomness in the blocks), and an image batch."""
    torch.manual_seed(0)
    model = tm.open_clip_model().double().train()
    for m in model.modules():
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = p
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    return model, tm.images().double()


@pytest.mark.parametrize("family", ["hf_clip", "open_clip"])
@pytest.mark.parametrize("settings", [{"coupling": "revvit"}, {"coupling": "meft"}], ids=["revvit", "meft"])
def test_attention_dropout_probability_is_replayed(family, settings):
    """Attention dropout given as a probability (no Dropout module) draws random numbers too:
    the reversible backward must replay the forward's masks and equal plain autograd through
    the same forward under the same seed (float64: agreement to rounding). Before the fix no
    RNG state was saved for these blocks and the whole gradient was 47-67 % wrong."""
    model, x = (_hf_tower_with_attention_dropout if family == "hf_clip" else _open_clip_with_mha_dropout)(0.3)
    apply_reversible(model, ReversibleConfig(**settings, towers="image"))
    run = (
        (lambda: model.vision_model(pixel_values=x).last_hidden_state)
        if family == "hf_clip"
        else (lambda: model.encode_image(x))
    )
    with rev.plain_autograd():
        ref_out, ref = _grads(model, run)
    out, got = _grads(model, run)
    with torch.no_grad():
        assert not torch.allclose(out, run())  # the dropout is on: another seed, another output
    assert torch.equal(out, ref_out)
    assert set(got) == set(ref)
    scale = _flat(ref, ref).norm()  # per parameter against the whole gradient: k_proj.bias's is 0 up to rounding
    assert max(float((got[n] - ref[n]).norm() / scale) for n in ref) <= 1e-12
    assert _rel(_flat(got, ref), _flat(ref, ref)) <= 1e-12
