"""Side methods against their official code (issue 23, points 10-14, 17, 18), on tiny float64
models with identical weights. Every reference below is written out here in plain torch from
what the official code computes (the repository and function are named at each test); none of
them calls the vleff helper it checks.

* VQT (andytu28/VQT ``src/models/vit_backbones/h2t_vit.py``): the query prompts attend to the
  frozen tokens' keys/values only; each layer's ``T`` outputs are L2-normalised together.
* LST (ylsung/Ladder-Side-Tuning ``seq2seq/third_party/models/t5/modeling_side_t5.py``,
  ``T5Stack.forward``): with ``add_residual_after=False`` (its default) the ladder merges block
  ``i``'s output before side block ``i``; the gates mix by ``mu_i = sigmoid(alpha_i / T)``.
* MemVP (JieShibo/MemVP ``memvp/adapter.py``, ``forward_clip``): the vision adapters' output is
  scaled by ``s = 0.1``.
* Side methods in general: no gradient reaches a *trainable* backbone through the side path; the
  per-forward side state ends with the forward that set it.
"""

from __future__ import annotations

import math

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from families import IMAGE
from vleff.side.lst import LSTConfig, apply_lst
from vleff.side.memvp import memvp_module
from vleff.side.unipt import apply_unipt
from vleff.side.vqt import apply_vqt

import vleff
from vleff.backbones import find_towers, get_patch
from vleff.models.vlm import VisionLanguageModel
from vleff.side import common

D = torch.float64


def _vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return tm.timm_vit(**kwargs).to(D).eval()


def _images(batch: int = 2) -> torch.Tensor:
    return tm.images(batch).to(D)


def _layer_norm(z: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    mu = z.mean(-1, keepdim=True)
    var = z.var(-1, unbiased=False, keepdim=True)
    return (z - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _linear(z: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
    return z @ lin.weight.T + (0 if lin.bias is None else lin.bias)


def _block_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block of the plain (unpatched) model."""
    ins: list[torch.Tensor] = []
    hs = [b.register_forward_pre_hook(lambda m, a: ins.append(a[0].detach().clone())) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return ins


# ----------------------------------------------------------------------------------------- VQT
def _h2t_block(block: torch.nn.Module, x: torch.Tensor, prompts: torch.Tensor, heads: int) -> torch.Tensor:
    """``Head2ToeBlock.forward`` of the reference on ``cat([prompts, x])`` with
    ``query_prompt_len = T``, written for a timm block's weights: queries from every row, keys
    and values from the rows after the prompts (the frozen tokens) only. Returns the ``T``
    prompt rows of the block output."""
    b, _, c = x.shape
    t = prompts.shape[0]
    dh = c // heads
    hidden = torch.cat([prompts.unsqueeze(0).expand(b, -1, -1), x], dim=1)
    normed = _layer_norm(hidden, block.norm1)
    w_q, w_k, w_v = block.attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = block.attn.qkv.bias.chunk(3)
    kv_rows = normed[:, t:]

    def heads_of(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(b, -1, heads, dh).permute(0, 2, 1, 3)

    q = heads_of(normed @ w_q.T + b_q)
    k = heads_of(kv_rows @ w_k.T + b_k)
    v = heads_of(kv_rows @ w_v.T + b_v)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
    ctx = (probs @ v).permute(0, 2, 1, 3).reshape(b, -1, c)
    hidden = hidden + _linear(ctx, block.attn.proj)
    mlp = _linear(F.gelu(_linear(_layer_norm(hidden, block.norm2), block.mlp.fc1)), block.mlp.fc2)
    return (hidden + mlp)[:, :t]


def _vqt_model(num_queries: int) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """A VQT model with random queries and projection, its images, the plain block inputs and the
    plain logits."""
    model = _vit()
    x = _images()
    ins = _block_inputs(model, x)
    with torch.no_grad():
        plain = model(x)
    apply_vqt(model, num_queries=num_queries)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.vleff_vqt.queries.copy_(torch.randn(model.vleff_vqt.queries.shape, generator=g, dtype=D))
        model.vleff_vqt.proj.weight.copy_(torch.randn(model.vleff_vqt.proj.weight.shape, generator=g, dtype=D))
    return model, x, ins, plain


def test_vqt_queries_attend_to_the_frozen_keys_and_values_only():
    """Point 10: each block's query outputs equal the reference's ``Head2ToeAttention`` (keys and
    values of the frozen rows only), not an attention over ``[frozen ; queries]``."""
    model, x, ins, _ = _vqt_model(num_queries=3)
    with torch.no_grad():
        model.forward_features(x)  # the query outputs wait for the head in the state's scratch
        outputs = get_patch(model).state.scratch["vqt"]
        for block, x_in, prompts, got in zip(model.blocks, ins, model.vleff_vqt.queries, outputs):
            torch.testing.assert_close(got, _h2t_block(block, x_in, prompts, heads=4), atol=1e-10, rtol=1e-10)


def test_vqt_normalises_each_layer_over_all_of_its_query_outputs():
    """Point 11: the reference concatenates ``F.normalize(q.view(B, -1))`` per layer (over the
    ``T·C`` values of the layer, ``NORMALIZE_FEATS=True``); the head reads that. With T = 3 this
    differs from normalising each query token on its own."""
    model, x, ins, plain = _vqt_model(num_queries=3)
    with torch.no_grad():
        got = model(x)
        outs = [_h2t_block(b, i, p, heads=4) for b, i, p in zip(model.blocks, ins, model.vleff_vqt.queries)]
        feats = torch.cat(
            [o.reshape(o.shape[0], -1) / o.reshape(o.shape[0], -1).norm(dim=1, keepdim=True) for o in outs], dim=1
        )
        proj = model.vleff_vqt.proj
        torch.testing.assert_close(got, plain + feats @ proj.weight.T + proj.bias, atol=1e-10, rtol=1e-10)
        per_token = torch.cat([F.normalize(o, dim=-1).flatten(1) for o in outs], dim=1)
        assert not torch.allclose(feats @ proj.weight.T, per_token @ proj.weight.T, atol=1e-3)  # the test can tell


# ----------------------------------------------------------------------------------------- LST
def _lst_by_hand(
    side: torch.nn.Module, layers: list[torch.Tensor], alphas: list[float], temperature: float, residual_after: bool
) -> torch.Tensor:
    """The reference's ``T5Stack.forward`` ladder with ``use_gate="learnable"``:
    ``s = Down_first(h_0)``; per layer ``i``, ``mu_i = 1 / (1 + exp(-alpha_i / T))`` and
    ``s = mu_i·s + (1 − mu_i)·Down_i(h_{i+1})`` merged before side block ``i``
    (``add_residual_after=False``) or after it (``True``); then the final side norm. The side
    blocks are used as given (their init from the backbone is tested in test_side.py); the
    pooled cls row goes through ``Up``."""
    s = _linear(layers[0], side.downs[0])
    for i, block in enumerate(side.blocks):
        mu = 1.0 / (1.0 + math.exp(-alphas[i] / temperature))
        if residual_after:
            s = block(s)
        s = mu * s + (1.0 - mu) * _linear(layers[i + 1], side.downs[i + 1])
        if not residual_after:
            s = block(s)
    return _linear(_layer_norm(s[:, 0], side.norm), side.up)


@pytest.mark.parametrize("residual_after", [None, True], ids=["default", "add_residual_after"])
def test_lst_ladder_order_and_gates_follow_the_reference(residual_after):
    """Points 12 and 13: the default merges block ``i``'s output before side block ``i`` (the
    reference's ``add_residual_after=False``); gates away from 0.5 mix by ``mu_i`` exactly."""
    model = _vit()
    x = _images()
    layers: list[torch.Tensor] = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: layers.append(a[0].detach().clone()))
    for b in model.blocks:
        b.register_forward_hook(lambda m, a, o: layers.append(o.detach().clone()))
    plain: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda m, a, o: plain.append(o.detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    settings = {} if residual_after is None else {"add_residual_after": residual_after}
    apply_lst(model, reduction=2, **settings)
    side = model.vleff_lst
    alphas = [0.3, -0.2, 0.05]  # mu = sigmoid(3), sigmoid(-2), sigmoid(0.5)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        side.gates.copy_(torch.tensor(alphas, dtype=D))
        side.up.weight.copy_(torch.randn(side.up.weight.shape, generator=g, dtype=D))
    fed: list[torch.Tensor] = []
    model.norm.register_forward_hook(lambda m, a, o: fed.append(o.detach().clone()))  # after LST's hook
    with torch.no_grad():
        model(x)
        layers = layers[: len(model.blocks) + 1]
        want = _lst_by_hand(side, layers, alphas, 0.1, residual_after=bool(residual_after))
        other = _lst_by_hand(side, layers, alphas, 0.1, residual_after=not residual_after)
    torch.testing.assert_close(fed[0][:, 0] - plain[0][:, 0], want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fed[0][:, 1:], plain[0][:, 1:], atol=0, rtol=0)  # only the pooled row
    assert (want - other).abs().max() > 1e-3  # the two orders differ: the test can tell them apart
    assert LSTConfig().add_residual_after is False


def test_lst_add_residual_after_is_checked():
    with pytest.raises(ValueError, match=r"add_residual_after=1 is not allowed; use True or False"):
        apply_lst(_vit(), add_residual_after=1)


# --------------------------------------------------------------------------------------- MemVP
def test_memvp_vision_adapters_are_scaled_by_the_reference_s():
    """Point 14: the reference's ``forward_clip`` adds ``adapter(ln_2(x))·s`` with ``s = 0.1``
    (``set_Clip_Adapter``); ``Adapter``: ``fc2(dropout(gelu(fc1(u))))``, no biases."""
    torch.manual_seed(0)
    vit = tm.timm_vit()
    vlm = VisionLanguageModel(vit, tm.hf_llama_lm(), "memvp", memvp={"n_mem": 16}).to(D).eval()
    x = _images()
    vleff.apply_memvp(vlm, n_mem=16, vision_adapter_dim=4)
    adapters = memvp_module(vlm).adapters
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in adapters:
            a.up.weight.copy_(torch.randn(a.up.weight.shape, generator=g, dtype=D))
        got = vlm.visual(x)
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for block, a in zip(vit.blocks, adapters):
            h = h + block.attn.forward(_layer_norm(h, block.norm1))
            u = _layer_norm(h, block.norm2)
            ffn = _linear(F.gelu(_linear(u, block.mlp.fc1)), block.mlp.fc2)
            h = h + ffn + 0.1 * (F.gelu(u @ a.down.weight.T) @ a.up.weight.T)
    torch.testing.assert_close(got, h[:, 1:], atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="vision_adapter_scale"):
        vleff.apply_memvp(vlm, n_mem=16, vision_adapter_dim=4, vision_adapter_scale=-1.0)


# -------------------------------------------------------------- trainable backbone (point 17)
def _apply_side(method: str, model: torch.nn.Module) -> None:
    if method == "lst":
        apply_lst(model, reduction=2, towers="image")
    elif method == "unipt":
        apply_unipt(model, towers="image")
    else:
        apply_vqt(model, num_queries=2)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "vleff_" in n and (".up." in n or ".proj." in n):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _side_output(model: torch.nn.Module, method: str, family: str, x: torch.Tensor) -> torch.Tensor:
    """Run the model and return only what the side network produced (its correction or VQT's
    projection), by wrapping the side module's last step."""
    tower = find_towers(model, "image")[0]
    module = tower.root.get_submodule(f"vleff_{method}")
    seen: list[torch.Tensor] = []
    if method == "vqt":
        handle = module.proj.register_forward_hook(lambda m, a, o: seen.append(o))
    else:
        handle = module.up.register_forward_hook(lambda m, a, o: seen.append(o))
    try:
        IMAGE[family](model, x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize(
    "method, family",
    [
        ("lst", "timm_vit"),
        ("unipt", "timm_vit"),
        ("lst", "open_clip"),
        ("unipt", "hf_clip"),
        ("vqt", "timm_vit"),
        ("vqt", "open_clip"),
    ],
)
def test_no_gradient_reaches_a_trainable_backbone_through_the_side_path(method, family):
    """Point 17: backbone weights left trainable (no freezing, unlike the callbacks), a loss on
    the side output alone: LST and UniPT read detached layer outputs, so no backbone weight gets a
    gradient; VQT's queries run through the blocks' own weights (those may get one, by design),
    but nothing reaches a weight that only the token stream uses (patch embedding, positions,
    class token), since the frozen keys/values are read detached."""
    from families import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[family].make().to(D).eval()
    _apply_side(method, model)  # a non-zero last layer: the side output has a gradient to pass on
    model.requires_grad_(True)  # unfrozen on purpose (apply_* froze the backbone, issue 24 item 15)
    tower = find_towers(model, "image")[0]
    side = {id(p) for p in tower.root.get_submodule(f"vleff_{method}").parameters()}
    backbone = [(n, p) for n, p in tower.root.named_parameters() if id(p) not in side]
    assert all(p.requires_grad for _, p in backbone)
    _side_output(model, method, family, _images()).square().sum().backward()
    blocks = {id(p) for b in tower.blocks() for p in b.parameters()} if method == "vqt" else set()
    reached = [n for n, p in backbone if p.grad is not None and id(p) not in blocks]
    assert reached == []  # not even a zero gradient: those weights are not in the side output's graph
    assert all(
        p.grad is not None
        for p in tower.root.get_submodule(f"vleff_{method}").parameters()
        if p.requires_grad and p.dim() > 1
    )


def test_vqt_block_weight_gradients_come_from_the_query_path_alone():
    """Point 17, VQT: with a trainable backbone, a block's ``qkv`` weight gets exactly the gradient
    the reference's query path gives with the frozen keys/values as constants (none through the
    frozen stream's keys/values)."""
    model, x, ins, _ = _vqt_model(num_queries=2)
    model.requires_grad_(True)  # a trainable backbone on purpose (apply_vqt froze it, issue 24 item 15)
    model.forward_features(x)
    outs = get_patch(model).state.scratch["vqt"]
    outs[1].square().sum().backward()
    block = model.blocks[1]
    ref_block = _vit().blocks[1]
    ref_block.load_state_dict(block.state_dict())
    _h2t_block(ref_block, ins[1], model.vleff_vqt.queries[1].detach(), heads=4).square().sum().backward()
    # the reference's query rows of qkv: the query projection; its key/value rows would also get a
    # gradient there through the frozen tokens' K/V, which vleff reads detached
    w = block.attn.qkv.weight
    q_rows = slice(0, w.shape[0] // 3)
    torch.testing.assert_close(w.grad[q_rows], ref_block.attn.qkv.weight.grad[q_rows], atol=1e-10, rtol=1e-10)
    assert torch.count_nonzero(w.grad[q_rows.stop :]) == 0  # no gradient into the frozen stream's K/V rows


# --------------------------------------------------------------------------- lifetime (point 18)
class _Boom(RuntimeError):
    pass


def _raise(*args):
    raise _Boom("a failure after the blocks")


@pytest.mark.parametrize("family", ["timm_vit", "open_clip", "hf_clip"])
@pytest.mark.parametrize("method", ["lst", "unipt", "vqt"])
def test_side_state_ends_with_the_forward_that_set_it(method, family):
    """Point 18: after a forward (complete, or one that raised after the blocks), the final norm,
    the head and a block called directly compute what the unpatched modules compute, with no
    correction left over from that forward."""
    from families import FAMILIES

    torch.manual_seed(0)
    model = FAMILIES[family].make().to(D).eval()
    tower = find_towers(model, "image")[0]
    norm, _ = common.final_norm(tower)
    head = tower.root.head if family == "timm_vit" else None
    _apply_side(method, model)
    x = _images()
    n = (tm.IMG // tm.PATCH) ** 2 + 1
    y = torch.randn(2, n, tower.embed_dim, dtype=D, generator=torch.Generator().manual_seed(9))

    def direct_calls_are_plain() -> None:
        with torch.no_grad():
            torch.testing.assert_close(norm(y), type(norm).forward(norm, y), atol=0, rtol=0)
            if head is not None:
                torch.testing.assert_close(head(y[:, 0]), type(head).forward(head, y[:, 0]), atol=0, rtol=0)
            extra = (None,) if family == "hf_clip" else ()  # HF CLIP layers take attention_mask positionally
            for block in tower.blocks()[1:]:
                # vleff's generic block equals the library's to float64 rounding
                torch.testing.assert_close(
                    block(y, *extra), type(block).forward(block, y, *extra), atol=1e-12, rtol=1e-12
                )

    with torch.no_grad():
        IMAGE[family](model, x)
    direct_calls_are_plain()
    # a forward that raises after the blocks, before the module that consumes the side state
    consumer = head if (method == "vqt" and head is not None) else norm
    handle = consumer.register_forward_pre_hook(_raise)
    with pytest.raises(_Boom), torch.no_grad():
        IMAGE[family](model, x)
    handle.remove()
    direct_calls_are_plain()
    with torch.no_grad():  # and the next forward still gets its correction
        out = IMAGE[family](model, x)
    vleff.get_method(method).remove(model)
    with torch.no_grad():
        assert not torch.allclose(out, IMAGE[family](model, x), atol=1e-6)


def _raise_after(*args):
    raise _Boom("a failure after the module's forward")


@pytest.mark.parametrize(
    "where", ["last_block_output_in_model_forward", "final_norm_in_forward_features", "block_in_forward_features"]
)
def test_side_state_is_dropped_wherever_the_forward_raises(where):
    """Point 18, each place a forward can end by an exception: after the last block inside the
    root's ``forward`` (the root's hook drops the state), in the final norm under
    ``forward_features``, which bypasses the root's ``forward`` (the norm's own hook), in a block
    under ``forward_features`` (the block's hook). Afterwards the final norm called directly is
    the plain norm."""
    model = _vit()
    _apply_side("lst", model)
    x = _images()
    if where == "last_block_output_in_model_forward":
        handle = model.blocks[-1].register_forward_hook(_raise_after)
        run = model
    elif where == "final_norm_in_forward_features":
        handle = model.norm.register_forward_pre_hook(_raise)
        run = model.forward_features
    else:
        handle = model.blocks[1].register_forward_pre_hook(_raise)
        run = model.forward_features
    with pytest.raises(_Boom), torch.no_grad():
        run(x)
    handle.remove()
    assert "lst" not in get_patch(model).state.scratch
    y = torch.randn(2, 17, 64, dtype=D)
    with torch.no_grad():
        torch.testing.assert_close(model.norm(y), type(model.norm).forward(model.norm, y), atol=0, rtol=0)
