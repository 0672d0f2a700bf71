"""Visual Query Tuning: the frozen stream is untouched, the model starts at the frozen model, the
query path alone is saved for backward, its gradients match a by-hand computation, and the
refusals are clear."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from vleff.side.vqt import VQTConfig, apply_vqt, freeze_backbone_for_vqt, remove_vqt, vqt_applied, vqt_parameters

import vleff
from vleff.backbones import get_patch
from vleff.profile.memory import saved_activation_bytes


def _model(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return tm.timm_vit(**kwargs).eval()


def _block_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone())) for b in model.blocks]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def test_frozen_token_stream_is_bit_identical_to_the_plain_forward():
    model = _model()
    x = tm.images()
    with torch.no_grad():
        plain = _block_outputs(model, x)
    apply_vqt(model, num_queries=3)
    with torch.no_grad():
        model.vleff_vqt.proj.weight.normal_()  # the queries reach the output ...
        with_vqt = _block_outputs(model, x)
    freeze_backbone_for_vqt(model)
    with_grad = _block_outputs(model, x)  # ... and the stream is the same with grad enabled
    for a, b, c in zip(plain, with_vqt, with_grad):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
        torch.testing.assert_close(c, a, atol=0, rtol=0)


def test_model_starts_exactly_at_the_frozen_model():
    model = _model()
    x = tm.images()
    with torch.no_grad():
        ref = model(x)
        apply_vqt(model, num_queries=2)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
        # depth·T·C queries + a depth·T·C → classes projection (the paper's head size), nothing C×C
        assert sum(p.numel() for p in vqt_parameters(model)) == 3 * 2 * 64 + 3 * 2 * 64 * 10 + 10
        model.vleff_vqt.proj.bias.fill_(0.5)  # and the head really reads the projection
        torch.testing.assert_close(model(x), ref + 0.5, atol=1e-5, rtol=1e-5)
    # FLOPs counted without grad (EfficiencyMonitor's way) equal those counted with grad: torch's
    # module tracker once failed on the no-grad view of the trainable queries
    from vleff.profile.flops import count_flops

    assert count_flops(model, x) == count_flops(model, x, no_grad=False) > count_flops(_model(), x)


def _storage_bytes(fn, model: torch.nn.Module) -> int:
    """Bytes of the non-parameter storages saved for backward by ``fn`` (each once)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _vqt_trained(img: int, num_queries: int = 1) -> torch.nn.Module:
    model = _model(img_size=img)
    apply_vqt(model, num_queries=num_queries)
    freeze_backbone_for_vqt(model)
    return model


@pytest.mark.parametrize("num_queries", [1, 4])
def test_only_the_query_path_and_the_frozen_kv_are_saved_for_backward(num_queries):
    """Saved bytes = the frozen K/V copies (2·B·N·C per block: what the queries must read) +
    the queries' logits/probabilities over the N frozen keys + a part that does not depend on N.
    Any activation of the token stream (N-sized) in the graph makes the remainder grow with N."""
    b, c, heads, t = 2, 64, 4, num_queries
    remainders = {}
    for img in (32, 64):  # 16 and 64 patches
        model = _vqt_trained(img, num_queries)
        depth = len(model.blocks)
        x = torch.randn(b, 3, img, img)
        n = (img // tm.PATCH) ** 2 + 1
        total = _storage_bytes(lambda: model(x).square().mean(), model)
        kv = depth * 2 * b * n * c * 4
        probs = depth * 2 * b * heads * t * n * 4  # softmax output (fp32) and its cast-back/dropout input
        remainders[img] = total - kv - probs
        query_path_bound = depth * b * t * c * 4 * 40 + 8 * b * c * 4 * (1 + depth * t)  # ~40 C-vectors/query/block
        assert 0 < remainders[img] <= query_path_bound, (img, total, kv, probs)
    assert remainders[64] <= 1.05 * remainders[32], remainders  # independent of the token count


def test_saved_activations_are_at_most_a_fifth_of_full_fine_tuning():
    x = tm.images(4)
    full = _model()
    full_bytes = saved_activation_bytes(lambda: full(x).square().mean())
    model = _vqt_trained(tm.IMG)
    vqt_bytes = saved_activation_bytes(lambda: model(x).square().mean())
    assert vqt_bytes <= 0.2 * full_bytes, (vqt_bytes, full_bytes)


def _by_hand_query_block(block: torch.nn.Module, x_in: torch.Tensor, p: torch.Tensor, heads: int) -> torch.Tensor:
    """One timm block's query path from its weights with plain torch ops: the queries attend to
    the frozen tokens' keys/values only (the reference's ``Head2ToeAttention``); LayerNorm → qkv →
    softmax → proj → MLP."""
    b, n, c = x_in.shape
    dh = c // heads
    w_qkv, b_qkv = block.attn.qkv.weight, block.attn.qkv.bias

    def ln(z, mod):
        mu = z.mean(-1, keepdim=True)
        var = z.var(-1, unbiased=False, keepdim=True)
        return (z - mu) / torch.sqrt(var + mod.eps) * mod.weight + mod.bias

    def split(z):  # [B, L, 3C] -> q, k, v [B, H, L, Dh]
        q, k, v = z.split(c, dim=-1)
        return [u.reshape(b, -1, heads, dh).permute(0, 2, 1, 3) for u in (q, k, v)]

    _, kx, vx = split(ln(x_in, block.norm1) @ w_qkv.T + b_qkv)
    pp = p.unsqueeze(0).repeat(b, 1, 1)
    qp = split(ln(pp, block.norm1) @ w_qkv.T + b_qkv)[0]
    attn = torch.softmax(qp @ kx.transpose(-1, -2) / dh**0.5, dim=-1)
    o = (attn @ vx).permute(0, 2, 1, 3).reshape(b, -1, c)
    pp = pp + o @ block.attn.proj.weight.T + block.attn.proj.bias
    hidden = F.gelu(ln(pp, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    return pp + hidden @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


@pytest.mark.parametrize("layer", [0, 2])
def test_query_gradients_equal_a_by_hand_computation(layer):
    model = _model()
    x = tm.images()
    inputs: list[torch.Tensor] = []
    model.blocks[layer].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
    apply_vqt(model, num_queries=2)
    freeze_backbone_for_vqt(model)
    model.forward_features(x)  # no head: the query outputs stay in the state's scratch
    outs = get_patch(model).state.scratch["vqt"]
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(outs[layer].shape, generator=g)
    (outs[layer] * weight).sum().backward()

    p = model.vleff_vqt.queries[layer].detach().clone().requires_grad_(True)
    with torch.no_grad():
        block_params = list(model.blocks[layer].parameters())
    assert not any(q.requires_grad for q in block_params)
    ref = _by_hand_query_block(model.blocks[layer], inputs[0], p, heads=4)
    torch.testing.assert_close(outs[layer].detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    (ref * weight).sum().backward()
    torch.testing.assert_close(model.vleff_vqt.queries.grad[layer], p.grad, atol=1e-5, rtol=1e-4)
    others = [i for i in range(len(model.blocks)) if i != layer]
    assert torch.count_nonzero(model.vleff_vqt.queries.grad[others]) == 0  # outputs are never fed forward


def test_remove_restores_the_model_exactly():
    model = _model()
    x = tm.images()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        apply_vqt(model, num_queries=2)
        model.vleff_vqt.proj.weight.normal_()
        assert not torch.allclose(model(x), ref)
        apply_vqt(model)  # applying again replaces
        assert len(vqt_parameters(model)) == 3
        remove_vqt(model)
        torch.testing.assert_close(model(x), ref, atol=0, rtol=0)
    assert not vqt_applied(model) and list(model.state_dict()) == keys
    assert not model.head._forward_hooks and not model.head._forward_pre_hooks and get_patch(model) is None
    assert [n for n, _ in model.named_modules()] == [n for n, _ in original.named_modules()]
    with pytest.raises(ValueError, match="not applied"):
        remove_vqt(model)


def test_public_entry_points_and_registry():
    assert vleff.apply_vqt is apply_vqt and vleff.remove_vqt is remove_vqt
    method = vleff.get_method("vqt")
    assert method.kind == "side" and method.config is VQTConfig and method.load_callback().settings_config is VQTConfig


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"num_queries": 0}, "num_queries=0"),
        ({"num_queries": True}, "num_queries"),
        ({"dropout": -0.1}, "dropout"),
        ({"towers": "all"}, "towers"),
    ],
)
def test_bad_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        apply_vqt(_model(), **bad)
    with pytest.raises(ValueError, match=match):
        vleff.callbacks.VisualQueryTuning(**bad)


def test_models_without_a_supported_tower_are_refused():
    with pytest.raises(TypeError, match="no supported"):
        apply_vqt(torch.nn.Linear(3, 3))
    model = tm.hf_blip_retrieval()
    with pytest.raises(TypeError, match="VQT does not support transformers"):
        apply_vqt(model)
    assert not vqt_applied(model)


class _Unfreezes(tl.TinyClassifier):
    def configure_optimizers(self):
        self.model.blocks[0].attn.qkv.weight.requires_grad_(True)  # the user's code unfreezes a weight
        return super().configure_optimizers()


def test_callback_freezes_the_backbone_keeps_it_in_eval_and_refuses_an_unfrozen_weight(tmp_path):
    module = tl.TinyClassifier()
    seen: list[tuple[bool, bool]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append((pl_module.model.blocks[0].training, pl_module.model.vleff_vqt.training))

    before = copy.deepcopy(module.model.blocks.state_dict())
    # validation after every step: Lightning puts the module back in train mode after it
    trainer = tl.trainer(
        tmp_path,
        [vleff.callbacks.VisualQueryTuning(num_queries=2), Watch()],
        max_steps=3,
        val_check_interval=1,
        limit_val_batches=1,
    )
    trainer.fit(module, tl.loader(8), tl.loader(4))
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.vleff_vqt.queries",
        "model.vleff_vqt.proj.weight",
        "model.vleff_vqt.proj.bias",
        "model.head.weight",
        "model.head.bias",
    }
    assert seen and all(s == (False, True) for s in seen)
    for key, value in module.model.blocks.state_dict().items():  # the backbone did not move
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)

    trainer = tl.trainer(tmp_path, [vleff.callbacks.VisualQueryTuning()], max_steps=1)
    with pytest.raises(RuntimeError, match=r"frozen backbone.*blocks\.0\.attn\.qkv\.weight"):
        trainer.fit(_Unfreezes(), tl.loader(8))


def test_mixin_applies_and_freezes(tmp_path):
    from vleff.callbacks import VQTMixin

    class Module(VQTMixin, tl.TinyClassifier):
        def __init__(self):
            super().__init__()
            self.use_vqt(num_queries=1)

    torch.manual_seed(0)
    module = Module()
    assert vqt_applied(module)
    assert all(not p.requires_grad for p in module.model.blocks.parameters())
    trainer = tl.trainer(tmp_path, max_steps=1)
    trainer.fit(module, tl.loader(4))
    assert not module.model.blocks[0].training and module.model.vleff_vqt.training
    trainer.save_checkpoint(tmp_path / "m.ckpt")  # side-only, like the callback's checkpoints
    keys = set(torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"])
    assert keys == {k for k in module.state_dict() if "vleff_vqt." in k or k.startswith("model.head.")}
    torch.manual_seed(0)  # ``Module()`` builds its backbone from the global seed, like the trained one
    frozen = Module().model.state_dict()
    torch.manual_seed(0)
    loaded = Module.load_from_checkpoint(tmp_path / "m.ckpt")  # only the side state loads onto it
    x = tm.images(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), module.eval()(x), atol=0, rtol=0)
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, frozen["blocks.0.attn.qkv.weight"])
    bad = torch.load(tmp_path / "m.ckpt", weights_only=False)
    bad["state_dict"].pop(next(k for k in bad["state_dict"] if "vleff_vqt." in k))
    with pytest.raises(KeyError, match="lacks side keys"):
        Module().on_load_checkpoint(bad)


def test_the_query_path_never_backpropagates_into_the_token_stream():
    """Even with a trainable backbone (outside the callback), a loss on the query outputs reaches
    no weight that only the token stream uses: the frozen K/V the queries read are detached."""
    model = _model()
    apply_vqt(model, num_queries=2)
    model.forward_features(tm.images())
    sum(o.square().sum() for o in get_patch(model).state.scratch["vqt"]).backward()
    assert model.vleff_vqt.queries.grad is not None
    stream_only = [model.patch_embed.proj.weight, model.cls_token, model.pos_embed]
    assert all(p.grad is None for p in stream_only)
