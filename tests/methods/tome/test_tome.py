"""ToMe: matching and merging against a brute-force reference, and the patched models."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from families import image_forwards
from hypothesis import given, settings
from hypothesis import strategies as st
from vleff.tokens.tome import apply_tome, effective_r, parse_r, remove_tome, tome_r, update_tome

import vleff
from vleff.backbones import AttentionConfig, find_tower, get_patch, last_token_state
from vleff.backbones.block import attention
from vleff.kernels.tome import bipartite_soft_matching, max_merge, merge_sum, merge_weighted


def brute_force_merge(x, size, metric, r, protected):
    """ToMe for one sample, written with Python loops straight from the paper's description."""
    n = x.shape[0]
    if r == 0:  # no merge, no reordering
        return x, size
    a = [i for i in range(n) if i % 2 == 0]
    b = [i for i in range(n) if i % 2 == 1]
    m = F.normalize(metric.double(), dim=-1)
    best = []
    for i in a:
        if i < protected:
            continue
        cands = [(float(m[i] @ m[j]), j) for j in b if j >= protected]
        score, j = max(cands, key=lambda t: (t[0], -t[1]))
        best.append((score, i, j))
    best.sort(key=lambda t: (-t[0], t[1]))
    merged = {i: j for _, i, j in best[:r]}
    groups = {j: [j] for j in b}
    for i, j in merged.items():
        groups[j].append(i)
    order = (
        list(range(protected)) + [i for i in a if i >= protected and i not in merged] + [j for j in b if j >= protected]
    )
    out_x, out_s = [], []
    for t in order:
        members = groups.get(t, [t])
        w = size[members]
        out_s.append(w.sum())
        out_x.append((x[members] * w[:, None]).sum(0) / w.sum())
    return torch.stack(out_x), torch.stack(out_s)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 23),
    c=st.integers(1, 6),
    protected=st.integers(0, 3),
    r_frac=st.floats(0, 1),
    seed=st.integers(0, 10_000),
)
def test_merge_matches_brute_force(n, c, protected, r_frac, seed):
    protected = min(protected, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, c, generator=g, dtype=torch.float64)
    metric = torch.randn(2, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n, 1), generator=g).double()
    r = int(r_frac * max_merge(n, protected))
    plan = bipartite_soft_matching(metric, r, protected)
    assert plan.r == r
    out, new_size = merge_weighted(x, size, plan)
    assert out.shape == (2, n - r, c)
    for bi in range(2):
        ref_x, ref_s = brute_force_merge(x[bi], size[bi, :, 0], metric[bi], r, protected)
        torch.testing.assert_close(out[bi], ref_x)
        torch.testing.assert_close(new_size[bi, :, 0], ref_s)
    # sizes are conserved, protected tokens pass through unchanged and first
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    torch.testing.assert_close(out[:, :protected], x[:, :protected], atol=0, rtol=0)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), protected=st.integers(0, 4), r=st.integers(0, 30))
def test_r_is_capped_and_sizes_sum_to_token_count(n, protected, r):
    protected = min(protected, n)
    metric = torch.randn(1, n, 4)
    plan = bipartite_soft_matching(metric, r, protected)
    assert plan.r == min(r, max_merge(n, protected))
    sizes = merge_sum(torch.ones(1, n, 1), plan)
    assert sizes.sum().item() == n
    source = merge_sum(torch.eye(n)[None], plan)
    assert torch.all(source.sum(1) == 1)  # every input token sits in exactly one output token


def test_max_merge_edges():
    assert max_merge(197, 1) == 98
    assert max_merge(198, 2) == 98
    assert max_merge(1, 1) == 0
    assert max_merge(3, 2) == 0  # the only B token is protected
    assert max_merge(4, 0) == 2


@pytest.mark.parametrize(
    "spec,expected",
    [
        (3, [3, 3, 3, 3]),
        ([1, 2], [1, 2, 0, 0]),
        ((4, 0.5), [2, 3, 5, 6]),
        ((4, 0.0), [4, 4, 4, 4]),
        (torch.tensor([1, 1, 1, 1]), [1, 1, 1, 1]),
        ({"r": 4, "inflection": 0.5}, [2, 3, 5, 6]),  # the ramp as a config can write it
    ],
)
def test_parse_r(spec, expected):
    assert parse_r(spec, 4) == expected


@pytest.mark.parametrize(
    "bad,match",
    [
        (-1, "r=-1"),
        ([1, 2, 3, 4, 5], "5 entries"),
        ("16", "r='16'"),
        ([1, -2], r"r\[1\]=-2"),
        ((4, 2.0), "inflection"),
        (1.5, "r=1.5"),
        (True, "r=True"),
        ([1, "a"], r"r\[1\]='a'"),
        ({"r": 4}, "exactly the keys 'r' and 'inflection'"),
    ],
)
def test_parse_r_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        parse_r(bad, 4)


def test_proportional_attention_equals_duplicated_tokens():
    """A token of size s attends like s identical copies of it (log s on the logits)."""
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float64) for _ in range(3))
    sizes = torch.tensor([1, 3, 1, 2, 1])
    idx = torch.repeat_interleave(torch.arange(n), sizes)
    for fused in (False, True):
        cfg = AttentionConfig(num_heads=h, scale=d**-0.5, dropout_p=0.0, fused=fused)
        bias = sizes.double().log()[None, None, None, :].expand(b, 1, 1, n)
        merged = attention(q, k, v, cfg, False, bias, False, None)
        dup = attention(q, k[:, :, idx], v[:, :, idx], cfg, False, None, False, None)
        torch.testing.assert_close(merged, dup)


FORWARDS = image_forwards()


@pytest.mark.parametrize("family", list(FORWARDS))
def test_r0_equals_original_and_remove_round_trips(family):
    make, fwd = FORWARDS[family]
    model = make().eval()
    x = tm.images()
    with torch.no_grad():
        ref = fwd(model, x)
        apply_tome(model, r=0)
        torch.testing.assert_close(fwd(model, x), ref, atol=1e-5, rtol=1e-5)
        apply_tome(model, r=3)
        merged = fwd(model, x)
        assert not torch.allclose(merged, ref, atol=0, rtol=1e-3)
        remove_tome(model)
        torch.testing.assert_close(fwd(model, x), ref, atol=0, rtol=0)
    assert get_patch(find_tower(model).root) is None


@pytest.mark.parametrize("family", list(FORWARDS))
def test_merging_on_every_family_keeps_prefix_first(family):
    make, fwd = FORWARDS[family]
    model = make().eval()
    tower = find_tower(model)
    x = tm.images()
    captured = {}
    final_norm_input = []
    blocks = tower.blocks()
    handle = blocks[-1].register_forward_hook(lambda mod, args, out: final_norm_input.append(out.shape[1]))
    with torch.no_grad():
        h0 = blocks[0].register_forward_pre_hook(lambda mod, args: captured.update(n=args[0].shape[1]))
        fwd(model, x)
        h0.remove()
        apply_tome(model, r=4, trace_source=True)
        fwd(model, x)
    handle.remove()
    state = last_token_state(model)
    depth, n0, p = len(blocks), captured["n"], tower.num_prefix_tokens
    assert state.token_counts == [n0 - sum(effective_r([4] * depth, n0, p)[:i]) for i in range(depth)]
    n_out = final_norm_input[-1]
    assert n_out == n0 - sum(effective_r([4] * depth, n0, p))
    # sizes add up to the input token count; the prefix tokens hold exactly themselves
    assert torch.all(state.size.sum(1) == n0)
    for i in range(p):
        assert torch.all(state.get("source")[:, i, i] == 1) and torch.all(state.get("source")[:, i].sum(-1) == 1)


def test_gradients_flow_through_merging_in_training():
    model = tm.timm_vit(drop_path_rate=0.1).train()
    apply_tome(model, r=4, prop_attn=False)
    x = tm.images()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", list(FORWARDS))
def test_bf16_autocast(family):
    make, fwd = FORWARDS[family]
    model = make()
    apply_tome(model, r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fwd(model.eval(), tm.images())
        assert torch.isfinite(out.float()).all()
        assert last_token_state(model).size.dtype == torch.float32
        loss = fwd(model.train(), tm.images()).float().square().mean()
    loss.backward()
    grads = [p.grad for p in find_tower(model).root.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_schedule_and_reapply():
    model = tm.timm_vit()
    apply_tome(model, r=2)
    assert tome_r(model) == [2, 2, 2]
    update_tome(model, r=[1, 0, 3])
    assert tome_r(model) == [1, 0, 3]
    apply_tome(model, r=(2, 1.0))
    assert tome_r(model) == [0, 2, 4]
    with pytest.raises(ValueError, match="r=-3"):
        update_tome(model, r=-3)


def test_bad_calls_raise_clear_errors():
    model = tm.timm_vit()
    with pytest.raises(ValueError, match="not applied"):
        remove_tome(model)
    with pytest.raises(ValueError, match="not applied"):
        update_tome(model, r=2)
    with pytest.raises(TypeError, match="Linear"):
        apply_tome(torch.nn.Linear(2, 2), r=2)
    with pytest.raises(TypeError, match="towers='text': VisionTransformer has no text tower"):
        apply_tome(tm.timm_vit(), r=2, towers="text")
    with pytest.raises(ValueError, match="towers='audio'"):
        apply_tome(model, r=2, towers="audio")
    with pytest.raises(ValueError, match="r=1.5"):
        apply_tome(model, r=1.5)
    # a failed re-apply leaves the earlier ToMe in place and the model usable
    apply_tome(model, r=2)
    with pytest.raises(ValueError, match="r=-1"):
        apply_tome(model, r=-1)
    assert tome_r(model) == [2, 2, 2]
    remove_tome(model)
    assert get_patch(find_tower(model).root) is None


def test_top_level_api_and_registry():
    model = tm.timm_vit()
    assert vleff.apply_tome(model, r=1) is model
    from vleff.registry import get_method

    method = get_method("tome")
    assert method.remove(model) is model
    with pytest.raises(ValueError, match="available"):
        get_method("nope")


def test_flops_fall_with_r():
    """count_flops of the merged model equals the analytic count from the per-block token counts
    (tests/measure/test_flops_against_formulas.py has the formula); r=0 is the baseline's."""
    from measure.test_flops_against_formulas import DH, B, vit_flops

    from vleff.profile import count_flops

    x = tm.images(batch=B)
    totals = {}
    for r in (0, 3):
        model = tm.timm_vit(depth=4).eval()
        apply_tome(model, r=r)
        totals[r] = count_flops(model, x)
        counts = last_token_state(model).token_counts
        out = counts[-1] - min(r, counts[-1] // 2)
        matching = sum(2 * B * ((n + 1) // 2) * (n // 2) * DH for n in counts) if r else 0
        assert counts == ([17] * 4 if r == 0 else [17, 14, 11, 8])
        assert totals[r] == vit_flops(counts, counts[1:] + [out]) + matching
    assert totals[3] < 0.8 * totals[0]


@pytest.mark.parametrize("family", ["timm", "open_clip", "hf_clip", "hf_blip"])
def test_gradient_checkpointing_trains_with_merging_on_every_family(family):
    """The library's own checkpointing recomputes each block in backward; a merged block replays
    from the token state it started from, so the gradients are those of the run without it
    (issue 30: it used to be refused)."""
    make, fwd = (lambda: tm.timm_vit(), lambda m, x: m(x)) if family == "timm" else FORWARDS[family]
    torch.manual_seed(0)
    model = make().train()
    apply_tome(model, r=2)
    plain = copy.deepcopy(model)
    if family in ("timm", "open_clip"):
        model.set_grad_checkpointing(True)
    else:
        model.gradient_checkpointing_enable()
    grads = []
    for m in (plain, model):
        fwd(m, tm.images()).float().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert last_token_state(model).token_counts[-1] < last_token_state(model).token_counts[0]  # it merged
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("family", list(FORWARDS))
def test_torch_compile_traces_one_graph_and_matches_eager(family):
    """Users ask for ToMe under torch.compile: the patched tower traces without graph breaks
    (checked with the aot_eager backend, which needs no C++ compiler) and gives the eager output."""
    import warnings

    import torch._dynamo

    make, fwd = FORWARDS[family]
    model = make().eval()
    apply_tome(model, r=2)
    x = tm.images()

    def run(images):
        return fwd(model, images)

    with torch.no_grad():
        ref = run(x)
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explained = torch._dynamo.explain(run)(x)
            out = torch.compile(run, backend="aot_eager")(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor(3), "not a tensor"),
        (float("nan"), "r=nan"),
        (float("inf"), "r=inf"),
        ((4, float("nan")), "r=\\(4, nan\\)"),
    ],
)
def test_r_values_python_cannot_convert_get_clear_errors(bad, match):
    """Issue 13: ``r=torch.tensor(3)`` and ``r=nan`` surfaced Python internals."""
    with pytest.raises(ValueError, match=match):
        apply_tome(tm.timm_vit(), r=bad)
