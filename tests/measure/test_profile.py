"""vleff.profile against independent hand counts: FLOPs, saved activations, optimizer state."""

from __future__ import annotations

import json
import types

import pytest
import tiny_models as tm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import vleff.profile.throughput as throughput_module
from vleff.profile import (
    ThroughputResult,
    compare_models,
    count_flops,
    flop_counter,
    measure_throughput,
    optimizer_state_bytes,
    peak_memory_bytes,
    plot_rows,
    print_table,
    rows_to_csv,
    rows_to_json,
    saved_activation_bytes,
)

B = 2


# --- analytic counts (2 FLOPs per multiply-add; matmuls and convolutions only) -----------------
def transformer_block_flops(batch: int, tokens: int, width: int, mlp_hidden: int) -> int:
    qkv = 2 * batch * tokens * width * 3 * width
    attention = 2 * (2 * batch * tokens * tokens * width)  # q kᵀ and p v, all heads together
    proj = 2 * batch * tokens * width * width
    mlp = 2 * (2 * batch * tokens * width * mlp_hidden)
    return qkv + attention + proj + mlp


def patch_embed_flops(batch: int, image: int, patch: int, width: int, channels: int = 3) -> int:
    return 2 * batch * (image // patch) ** 2 * width * channels * patch * patch


def vit_flops(batch=B, image=tm.IMG, patch=tm.PATCH, width=64, depth=3, mlp_hidden=256, classes=10, prefix=1):
    tokens = (image // patch) ** 2 + prefix
    return (
        patch_embed_flops(batch, image, patch, width)
        + depth * transformer_block_flops(batch, tokens, width, mlp_hidden)
        + 2 * batch * width * classes
    )


def set_fused(model: nn.Module, fused: bool) -> None:
    for blk in model.blocks:
        blk.attn.fused_attn = fused


# --- FLOPs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_timm_vit_flops_equal_analytic(fused):
    model = tm.timm_vit().eval()
    set_fused(model, fused)
    assert count_flops(model, tm.images(B)) == vit_flops()


def test_timm_vit_fused_attention_op_is_counted():
    """The fused CPU kernel is what runs, and it now carries the attention FLOPs."""
    model = tm.timm_vit().eval()
    set_fused(model, True)
    with torch.no_grad(), flop_counter() as fc:
        model(tm.images(B))
    per_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert per_op.get("aten._scaled_dot_product_flash_attention_for_cpu") == 3 * 4 * B * 17 * 17 * 64


def test_training_flops_fused_equals_unfused_plus_recompute():
    """Forward + backward: the fused kernel's backward recomputes q kᵀ once more than the
    unfused matmul chain's backward; everything else is identical."""
    x = tm.images(B)
    counts = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = tm.timm_vit()
        set_fused(model, fused)
        with flop_counter() as fc:
            model(x).sum().backward()
        counts[fused] = fc.get_total_flops()
    recompute = 3 * 2 * B * 17 * 17 * 64  # one q kᵀ per block
    assert counts[True] == counts[False] + recompute


def test_deit_distilled_flops_equal_analytic():
    model = tm.timm_deit_distilled().eval()
    # two prefix tokens (cls, dist); two heads of 10 classes each
    expected = vit_flops(prefix=2) + 2 * B * 64 * 10
    assert count_flops(model, tm.images(B)) == expected


def open_clip_image_flops(batch=B, width=64, layers=2, embed_dim=32):
    tokens = (tm.IMG // tm.PATCH) ** 2 + 1
    return (
        patch_embed_flops(batch, tm.IMG, tm.PATCH, width)
        + layers * transformer_block_flops(batch, tokens, width, 4 * width)
        + 2 * batch * width * embed_dim
    )


@pytest.mark.parametrize("disable_fastpath", [True, False])
def test_open_clip_image_tower_flops_equal_analytic(disable_fastpath):
    """Both routes count the nn.MultiheadAttention fast path fully: turning it off, or the
    formula vleff registers for ``aten._native_multi_head_attention``."""
    model = tm.open_clip_model().eval()
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), flop_counter(disable_mha_fastpath=disable_fastpath) as fc:
        model.visual(tm.images(B))
    ops = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert ("aten._native_multi_head_attention" in ops) == (not disable_fastpath)
    assert fc.get_total_flops() == open_clip_image_flops()
    assert torch.backends.mha.get_fastpath_enabled() == before  # restored


def test_fastpath_flag_restored_after_error():
    before = torch.backends.mha.get_fastpath_enabled()

    def boom(x):
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        count_flops(boom, tm.images(1))
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_hf_clip_vision_flops_equal_analytic():
    model = tm.hf_clip_model().eval()
    tokens = (tm.IMG // tm.PATCH) ** 2 + 1
    expected = patch_embed_flops(B, tm.IMG, tm.PATCH, 64) + 2 * transformer_block_flops(B, tokens, 64, 128)
    assert count_flops(model.vision_model, pixel_values=tm.images(B)) == expected


def test_hf_blip_vision_flops_equal_analytic():
    """BLIP's vision tower: one fused qkv Linear (64 -> 192) and explicit q kᵀ / p v matmuls
    per layer; no projection head inside ``vision_model`` (post-layernorm only)."""
    model = tm.hf_blip_retrieval().eval()
    tokens = (tm.IMG // tm.PATCH) ** 2 + 1
    expected = patch_embed_flops(B, tm.IMG, tm.PATCH, 64) + 2 * transformer_block_flops(B, tokens, 64, 128)
    assert count_flops(model.vision_model, pixel_values=tm.images(B)) == expected


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), nq=st.integers(1, 9), nk=st.integers(1, 9), d=st.sampled_from([4, 8, 16])
)
def test_sdpa_flops_equal_explicit_matmuls(b, h, nq, nk, d):
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    fused = count_flops(F.scaled_dot_product_attention, q, k, v)
    explicit = count_flops(lambda: (q @ k.transpose(-2, -1)).softmax(-1) @ v)
    assert fused == explicit == 4 * b * h * nq * nk * d


def test_count_flops_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        count_flops(3, tm.images(1))


# --- memory --------------------------------------------------------------------------------------
def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_saved_activation_bytes_hand_count():
    mlp, x = tiny_mlp(), torch.randn(5, 8)
    # Linear 1 saves its input x (for the weight gradient): 5*8 floats. ReLU saves its output,
    # which Linear 2 also saves as its input: one 5*16 storage, counted once. Weights (saved
    # for input gradients) are parameters and excluded.
    expected = (5 * 8 + 5 * 16) * 4
    assert saved_activation_bytes(lambda: mlp(x)) == expected
    # including parameters adds Linear 2's weight (x needs no grad, so Linear 1's weight is not saved)
    assert saved_activation_bytes(lambda: mlp(x), include_parameters=True) == expected + 16 * 4 * 4
    x.requires_grad_(True)
    assert saved_activation_bytes(lambda: mlp(x), include_parameters=True) == expected + (16 * 4 + 8 * 16) * 4
    # excluding the input's storage removes it
    assert saved_activation_bytes(lambda: mlp(x), exclude=[x]) == 5 * 16 * 4


def test_saved_activation_bytes_needs_grad():
    mlp = tiny_mlp()
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad"):
        saved_activation_bytes(lambda: mlp(torch.randn(2, 8)))


def test_saved_activation_bytes_grows_with_batch():
    model = tm.timm_vit()
    small = saved_activation_bytes(lambda: model(tm.images(1)))
    large = saved_activation_bytes(lambda: model(tm.images(4)))
    assert small > 0 and large == pytest.approx(4 * small, rel=0.02)


def test_optimizer_state_bytes_adamw():
    mlp = tiny_mlp()
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3)
    assert optimizer_state_bytes(opt) == 0  # state is lazy
    mlp(torch.randn(3, 8)).sum().backward()
    opt.step()
    expected = 0
    for p in mlp.parameters():
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape
        expected += state["exp_avg"].nbytes + state["exp_avg_sq"].nbytes + state["step"].nbytes
    assert expected == sum(2 * p.numel() * 4 + 4 for p in mlp.parameters())
    assert optimizer_state_bytes(opt) == expected


def test_optimizer_state_bytes_follows_objects_and_dedupes():
    class Projector:
        def __init__(self, mat):
            self.mat = mat

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    shared = torch.zeros(10, 10)
    p = opt.param_groups[0]["params"][0]
    opt.state[p] = {"proj": Projector(shared), "again": shared, "view": shared[:2]}
    assert optimizer_state_bytes(opt) == 10 * 10 * 4


def test_peak_memory_bytes_cpu_sees_large_allocation():
    """A fresh 64 MiB inside ``fn`` shows in the peak. The pages come from an anonymous mmap,
    touched one by one: a tensor of that size can be served from memory the allocator already
    holds resident after earlier tests (the documented under-count), which made this flaky."""
    import mmap

    size = 64 * 2**20

    def touch() -> mmap.mmap:
        buf = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            buf[offset] = 1
        return buf

    peak = peak_memory_bytes(touch, device="cpu")
    assert size // 2 <= peak < 4 * size


def test_peak_memory_bytes_bad_device():
    with pytest.raises(ValueError, match="device"):
        peak_memory_bytes(lambda: None, device="meta")


# --- throughput, compare, report -----------------------------------------------------------------
def test_measure_throughput_structure():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    results = measure_throughput(
        {"a": make("a"), "b": make("b")}, items_per_call=8, warmup=2, repeats=3, progress=False
    )
    assert list(results) == ["a", "b"] and calls == {"a": 5, "b": 5}
    for name, r in results.items():
        assert isinstance(r, ThroughputResult) and r.name == name and len(r.times_s) == 3
        assert r.items_per_s == pytest.approx(8 / r.median_s)
    assert results["a"].speedup == 1.0
    assert results["b"].speedup == pytest.approx(results["b"].items_per_s / results["a"].items_per_s)


def test_measure_throughput_order_and_medians_with_fake_clock(monkeypatch):
    """Exact call/clock sequence and medians, with the module's clock replaced by a fake one
    that only the candidates advance (each call costs a known number of "seconds")."""
    events: list[str] = []
    now = [0.0]

    def perf_counter():
        events.append("t")
        return now[0]

    monkeypatch.setattr(throughput_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    names, warmup, repeats, items = ["a", "b", "c"], 2, 5, 6
    warmup_cost = 1000.0  # would dominate any timed repeat it leaked into
    timed_costs = {
        "a": [4.0, 1.0, 7.0, 2.0, 5.0],  # median 4 (mean 3.8, min 1)
        "b": [2.0, 50.0, 1.0, 3.0, 2.0],  # median 2 (mean 11.6)
        "c": [8.0, 7.0, 30.0, 9.0, 8.0],
    }  # median 8 (mean 12.4)
    calls_so_far = dict.fromkeys(names, 0)

    def make(name):
        def fn():
            k = calls_so_far[name]
            calls_so_far[name] += 1
            events.append(name)
            now[0] += warmup_cost if k < warmup else timed_costs[name][k - warmup]

        return fn

    results = measure_throughput(
        {n: make(n) for n in names}, items_per_call=items, warmup=warmup, repeats=repeats, progress=False
    )

    # warm-up: every candidate `warmup` times, before the clock is ever read
    n_warm = len(names) * warmup
    assert "t" not in events[:n_warm]
    assert sorted(events[:n_warm]) == sorted(names * warmup)
    # then rounds: every call bracketed by two clock reads, round i starts at candidate i mod n
    timed = events[n_warm:]
    assert len(timed) == 3 * len(names) * repeats
    calls = timed[1::3]
    assert timed[0::3] == ["t"] * len(calls) and timed[2::3] == ["t"] * len(calls)
    rounds = [calls[i * len(names) : (i + 1) * len(names)] for i in range(repeats)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"], ["b", "c", "a"]]

    # each timed repeat is exactly that call's cost (no warm-up time leaks in), in round order
    medians = {"a": 4.0, "b": 2.0, "c": 8.0}  # by hand from the lists above
    assert list(results) == names
    for name, r in results.items():
        assert r.times_s == timed_costs[name]
        assert r.median_s == medians[name]
        assert r.items_per_s == pytest.approx(items / medians[name])
    # speedup = baseline median / candidate median
    assert results["a"].speedup == 1.0
    assert results["b"].speedup == pytest.approx(4.0 / 2.0)
    assert results["c"].speedup == pytest.approx(4.0 / 8.0)


def test_measure_throughput_even_repeats_median_and_real_clock():
    """Even repeats: the median is the mean of the middle two. Real clock: sleeps are timed
    (only lower bounds are asserted: a loaded machine makes sleeps overshoot, never undershoot)."""
    import time

    results = measure_throughput(
        {"fast": lambda: time.sleep(0.005), "slow": lambda: time.sleep(0.02)},
        items_per_call=1,
        warmup=1,
        repeats=4,
        progress=False,
    )
    for r in results.values():
        ordered = sorted(r.times_s)
        assert r.median_s == pytest.approx((ordered[1] + ordered[2]) / 2)
    assert results["fast"].median_s >= 0.005 and results["slow"].median_s >= 0.02
    assert results["slow"].speedup == pytest.approx(results["fast"].median_s / results["slow"].median_s)


def test_measure_throughput_bad_args():
    with pytest.raises(ValueError, match="empty"):
        measure_throughput({}, items_per_call=1)
    with pytest.raises(ValueError, match="items_per_call"):
        measure_throughput({"a": lambda: None}, items_per_call=0)
    with pytest.raises(TypeError, match="'a'"):
        measure_throughput({"a": 3}, items_per_call=1)


def test_compare_models_rows_and_reports(tmp_path):
    torch.manual_seed(0)
    base, small = tm.timm_vit(), tm.timm_vit(depth=1)
    base.train()
    x = tm.images(B)
    rows = compare_models({"baseline": base, "depth1": small}, x, repeats=2, warmup=1, progress=False)
    assert [r["name"] for r in rows] == ["baseline", "depth1"]
    assert rows[0]["gflops_per_sample"] * 1e9 * B == pytest.approx(vit_flops())
    assert rows[1]["gflops_per_sample"] * 1e9 * B == pytest.approx(vit_flops(depth=1))
    assert rows[0]["flops_ratio"] == 1.0 and rows[1]["flops_ratio"] < 0.5
    assert rows[0]["speedup"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert rows[1]["activation_mib"] < rows[0]["activation_mib"]
    assert base.training and small.training  # modes restored
    print_table(rows, extra_columns={"params_m": "params (M)"})
    data = json.loads(rows_to_json(rows, tmp_path / "r.json", model="tiny").read_text())
    assert data["model"] == "tiny" and data["rows"][1]["name"] == "depth1"
    assert rows_to_csv(rows, tmp_path / "r.csv").read_text().splitlines()[0].startswith("name,")
    png = plot_rows(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
