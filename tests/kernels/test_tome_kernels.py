"""Triton ToMe kernels against the PyTorch reference, on CPU under ``TRITON_INTERPRET=1``.

Triton reads ``TRITON_INTERPRET`` when a function is *decorated*, including its own
standard library, so the interpreter only works in a process that set the variable before
importing Triton. timm and Lightning import Triton, so in a normal test session this module
collects a single test that re-runs this file in a fresh subprocess with the variable set;
run directly with ``TRITON_INTERPRET=1`` (e.g. ``TRITON_INTERPRET=1 pytest tests/kernels/test_tome_kernels.py``)
the tests run in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _interpreter_active() -> bool:
    """True when every Triton function in this process is (or will be) interpreted."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard

    return type(standard.zeros_like).__name__ == "InterpretedFunction"


IN_INTERPRETER = _interpreter_active()

import torch  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vleff.kernels import tome  # noqa: E402
from vleff.kernels.tome import max_merge, similarity_scores  # noqa: E402

if IN_INTERPRETER:
    from vleff.kernels import triton_tome as tt


def run_file_under_interpreter(path: str) -> None:
    """Run the test file ``path`` in a fresh interpreter-mode process; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", path, "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore"]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(path))),
    )
    assert proc.returncode == 0, f"interpreter run of {path} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_kernels_under_triton_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already running under TRITON_INTERPRET=1: the tests below ran in-process")
    run_file_under_interpreter(__file__)


SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def _metric(seed: int, b: int, n: int, c: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=gen).to(dtype)


def _plans_equal(p: tome.MergePlan, q: tome.MergePlan) -> bool:
    return (
        torch.equal(p.src_idx, q.src_idx)
        and torch.equal(p.dst_idx, q.dst_idx)
        and torch.equal(p.unm_idx, q.unm_idx)
        and p.num_protected == q.num_protected
        and p.num_tokens == q.num_tokens
    )


def _well_separated(metric: torch.Tensor, num_protected: int, gap: float = 1e-4) -> bool:
    """No near-ties in a row's best match nor between rows' best scores (argsort order)."""
    scores = similarity_scores(metric, num_protected)
    if scores.shape[-1] >= 2:
        top2 = scores.topk(2, dim=-1).values
        finite = torch.isfinite(top2[..., 0])
        if ((top2[..., 0] - top2[..., 1])[finite] < gap).any():
            return False
    best = scores.max(-1).values
    for row in best:
        vals = row[torch.isfinite(row)].sort().values
        if (vals.diff() < gap).any():
            return False
    return True


# ----------------------------------------------------------------------------- matching


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    n=st.integers(2, 33),
    c=st.integers(1, 32),
    p=st.integers(0, 2),
    dtype=st.sampled_from(DTYPES),
    small_tiles=st.booleans(),
)
def test_best_match_equals_reference_max(seed, b, n, c, p, dtype, small_tiles):
    metric = _metric(seed, b, n, c, dtype)
    blocks = (16, 16, 16) if small_tiles else (32, 32, 32)
    got_max, got_idx = tt.best_match_launch(metric, p, blocks=blocks)
    scores = similarity_scores(metric, p)
    ref_max, ref_idx = scores.max(dim=-1)
    finite = torch.isfinite(ref_max)
    assert torch.equal(torch.isfinite(got_max), finite)
    torch.testing.assert_close(got_max[finite], ref_max[finite], atol=2e-6, rtol=0)
    # the chosen B token scores the maximum (tie tolerant) ...
    picked = scores.gather(-1, got_idx.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(picked[finite], ref_max[finite], atol=2e-6, rtol=0)
    # ... and is the reference's index wherever the runner-up is not within rounding
    if scores.shape[-1] >= 2:
        top2 = scores.topk(2, dim=-1).values
        clear = (top2[..., 0] - top2[..., 1] > 1e-5) | ~finite
    else:
        clear = torch.ones_like(finite)
    assert torch.equal(got_idx[clear], ref_idx[clear])


def test_best_match_ties_pick_lowest_index_like_torch_max():
    # C = 1: every cosine similarity is exactly +-1, so rows are full of exact ties; duplicated
    # B tokens (and a zero token: similarity 0 everywhere) add more. Tiles of 16 make the
    # first maximum of a row sit in an earlier tile than later equal maxima.
    gen = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 67, 1, generator=gen)
    metric[:, 5] = 0.0
    for p in (0, 1, 2):
        got_max, got_idx = tt.best_match_launch(metric, p, blocks=(16, 16, 16))
        ref_max, ref_idx = similarity_scores(metric, p).max(dim=-1)
        assert torch.equal(got_idx, ref_idx)
        assert torch.equal(got_max, ref_max)
    wide = torch.randn(1, 33, 8, generator=gen)
    wide[:, 1::2] = wide[:, 1:2]  # all B tokens identical: every A row ties across all of B
    _, idx = tt.best_match_launch(wide, 0, blocks=(16, 16, 16))
    assert torch.equal(idx, torch.zeros_like(idx))


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    n=st.integers(3, 33),
    c=st.integers(2, 32),
    p=st.integers(0, 2),
    dtype=st.sampled_from(DTYPES),
    r_frac=st.floats(0.0, 1.0),
)
def test_plan_equals_reference(seed, b, n, c, p, dtype, r_frac):
    metric = _metric(seed, b, n, c, dtype)
    assume(_well_separated(metric, p))
    r = round(r_frac * max_merge(n, p))
    ref = tome.bipartite_soft_matching(metric, r, p, backend="torch")
    got = tome.bipartite_soft_matching(metric, r, p, backend="triton")
    assert _plans_equal(got, ref)


@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 17, 33])
def test_plan_r_zero_and_over_maximal_r(n, p):
    # C = 1 makes scores exact (+-1), so plans compare exactly even with ties
    metric = _metric(n + p, 2, n, 1, torch.float32)
    for r in (0, max_merge(n, p), 10 * n + 5):
        got = tome.bipartite_soft_matching(metric, r, p, backend="triton")
        if n >= 2:
            assert _plans_equal(got, tome.bipartite_soft_matching(metric, r, p, backend="torch"))
        assert got.r == min(r, max_merge(n, p))
        assert got.num_out == n - got.r


# ----------------------------------------------------------------------------- merge


def _random_plan(seed: int, b: int, n: int, p: int, r: int) -> tome.MergePlan:
    return tome.bipartite_soft_matching(_metric(seed + 1, b, n, 4, torch.float32), r, p, backend="torch")


def _grads(fn, inputs, grad_out):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, g) for o, g in zip(outs, grad_out) if g is not None]
    return outs, torch.autograd.grad([o for o, _ in used], inputs, [g for _, g in used])


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    n=st.integers(3, 33),
    c=st.integers(1, 32),
    p=st.integers(0, 2),
    dtype=st.sampled_from(DTYPES),
    r_frac=st.floats(0.0, 1.0),
    size_grad=st.booleans(),
)
def test_merge_weighted_forward_backward_equal_reference(seed, b, n, c, p, dtype, r_frac, size_grad):
    r = round(r_frac * max_merge(n, p))
    plan = _random_plan(seed, b, n, p, r)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen).to(dtype)
    size = torch.randint(1, 5, (b, n, 1), generator=gen).float()
    g_x = torch.randn(b, n - plan.r, c, generator=gen)
    g_s = torch.randn(b, n - plan.r, 1, generator=gen) if size_grad else None

    # ground truth: the reference in fp64 (the fp16/bf16 reference itself rounds x*size)
    x64 = x.double().requires_grad_()
    s64 = size.double().requires_grad_(size_grad)
    inputs64 = (x64, s64) if size_grad else (x64,)
    (ref_x, ref_s), ref_grads = _grads(
        lambda *t: tome.merge_weighted(x64, s64, plan, backend="torch"),
        inputs64,
        (g_x.double(), None if g_s is None else g_s.double()),
    )

    xt = x.clone().requires_grad_()
    st_ = size.clone().requires_grad_(size_grad)
    inputs = (xt, st_) if size_grad else (xt,)
    (out_x, out_s), grads = _grads(
        lambda *t: tome.merge_weighted(xt, st_, plan, backend="triton"), inputs, (g_x.to(dtype), g_s)
    )
    assert out_x.dtype == dtype and out_s.dtype == size.dtype
    assert out_x.shape == (b, n - plan.r, c)
    tol = TOL[dtype]
    torch.testing.assert_close(out_x.double(), ref_x, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(out_s.double(), ref_s, atol=0, rtol=0)  # integer sizes: exact
    torch.testing.assert_close(grads[0].double(), ref_grads[0], atol=tol * 4, rtol=tol)
    if size_grad:
        # sums c products of rounded outputs: allow c-fold rounding of the 16-bit outputs
        torch.testing.assert_close(grads[1].double(), ref_grads[1], atol=tol * 4 * c, rtol=tol)
    if dtype == torch.float32:  # and against the fp32 reference directly
        torch.testing.assert_close(out_x, tome.merge_weighted(x, size, plan, backend="torch")[0])


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 2),
    n=st.integers(3, 33),
    c=st.integers(1, 32),
    p=st.integers(0, 2),
    dtype=st.sampled_from(DTYPES),
    r_frac=st.floats(0.0, 1.0),
)
def test_merge_sum_forward_backward_equal_reference(seed, b, n, c, p, dtype, r_frac):
    r = round(r_frac * max_merge(n, p))
    plan = _random_plan(seed, b, n, p, r)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(b, n, c, generator=gen).to(dtype)
    g = torch.randn(b, n - plan.r, c, generator=gen)
    t64 = t.double().requires_grad_()
    ref = tome.merge_sum(t64, plan, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref, t64, g.double())
    tg = t.clone().requires_grad_()
    out = tome.merge_sum(tg, plan, backend="triton")
    (grad,) = torch.autograd.grad(out, tg, g.to(dtype))
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * 8, rtol=tol)
    # the backward of a sum is a copy of the output gradient: exact in every dtype
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), atol=0, rtol=0)


def test_merge_source_map_and_sizes_exact():
    # what ToMe's source tracking does: one-hot rows summed stay 0/1, sizes stay integers
    n, p = 33, 1
    plan = _random_plan(7, 2, n, p, max_merge(n, p))
    source = torch.eye(n).expand(2, n, n).contiguous()
    size = torch.ones(2, n, 1)
    for _ in range(2):
        got_src = tome.merge_sum(source, plan, backend="triton")
        got_size = tome.merge_sum(size, plan, backend="triton")
        assert torch.equal(got_src, tome.merge_sum(source, plan, backend="torch"))
        assert torch.equal(got_size, tome.merge_sum(size, plan, backend="torch"))
        assert torch.equal(got_src.sum(-1, keepdim=True), got_size)
    assert torch.equal(got_src[:, 0], source[:, 0])  # protected cls first, untouched


def test_merge_is_deterministic_and_handles_strided_inputs():
    n, p = 33, 2
    plan = _random_plan(11, 2, n, p, 9)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, n, generator=gen).transpose(1, 2)  # [2, n, 40], non-contiguous
    size = torch.rand(2, n, 1, generator=gen) + 0.5
    a = tome.merge_weighted(x, size, plan, backend="triton")
    b = tome.merge_weighted(x.contiguous(), size, plan, backend="triton")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], tome.merge_weighted(x, size, plan, backend="torch")[0])


def test_merge_rejects_bad_inputs():
    from vleff.kernels import triton_ops

    plan = _random_plan(0, 2, 9, 1, 2)
    x = torch.randn(2, 9, 4)
    with pytest.raises(ValueError, match="size must be"):
        triton_ops.merge_weighted_triton(x, torch.ones(2, 9), plan)
    with pytest.raises(ValueError, match=r"t must be \[B, N, C\]"):
        triton_ops.merge_sum_triton(torch.randn(2, 8, 4), plan)
    with pytest.raises(ValueError, match="floating point"):
        triton_ops.merge_sum_triton(torch.ones(2, 9, 4, dtype=torch.int64), plan)


# ----------------------------------------------------------------------------- ops, FLOPs


def test_flop_count_is_the_same_on_both_backends():
    import vleff.kernels.flops  # noqa: F401  (registers the formulas)

    b, n, c, p = 2, 33, 16, 1
    metric = _metric(0, b, n, c, torch.float32)
    counts = {}
    for backend in ("torch", "triton"):
        with FlopCounterMode(display=False) as fc:
            tome.bipartite_soft_matching(metric, 5, p, backend=backend)
        counts[backend] = fc.get_total_flops()
    assert counts["torch"] == counts["triton"] == 2 * b * 17 * 16 * c
    with FlopCounterMode(display=False) as fc:
        tome.bipartite_soft_matching(metric, 5, p, backend="triton")
    assert "vleff.tome_best_match" in str(fc.get_flop_counts())


def test_custom_ops_pass_opcheck():
    plan = _random_plan(5, 2, 11, 1, 3)
    index = tt.merge_index(plan)
    x = torch.randn(2, 11, 8, requires_grad=True)
    size = torch.randint(1, 4, (2, 11, 1)).float()
    idx = (index.base, index.seg_start, index.seg_end, index.srcs, index.out_row)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.vleff.tome_merge_weighted.default, (x, size, *idx), test_utils=tests)
    torch.library.opcheck(torch.ops.vleff.tome_merge_sum.default, (x, *idx), test_utils=tests)
    torch.library.opcheck(torch.ops.vleff.tome_best_match.default, (x.detach(), 1), test_utils=tests)


def test_kernel_bench_runs_both_backends_and_they_agree(tmp_path):
    from vleff.cli.kernels_bench import run_kernel_bench

    out = tmp_path / "kernels.json"
    cfg = {
        "mode": "kernels",
        "kernels": {
            "interpret": True,
            "tome_batch": 2,
            "tome_tokens": 33,
            "tome_channels": 16,
            "lowrank_m": 32,
            "lowrank_n": 24,
            "lowrank_rank": 4,
            "warmup": 0,
            "repeats": 1,
            "out": str(out),
        },
    }
    rows = run_kernel_bench(cfg)
    assert {(r["case"], r["backend"]) for r in rows} == {
        (c, b)
        for c in (
            "tome_match",
            "tome_merge",
            "tome_match+merge",
            "tome_merge_fwd+bwd",
            "galore_project",
            "galore_project_back",
            "galore_adam_step",
        )
        for b in ("torch", "triton")
    }
    for row in rows:
        assert row["ms"] > 0
        if row["case"] == "tome_match":
            assert row["same_sources"] == 1.0
        else:
            assert row["max_abs_diff"] < 1e-4, row
    assert out.exists()


def test_tome_model_end_to_end_on_the_triton_path(monkeypatch):
    # the whole ToMe model (helper hooks + these kernels), switched by VLEFF_KERNELS
    from vleff.cli.kernels_bench import run_kernel_bench

    calls = {"match": 0, "merge": 0}
    match, merge = tt.best_match_launch, tt.merge_fwd_launch

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(tt, "best_match_launch", counted("match", match))
    monkeypatch.setattr(tt, "merge_fwd_launch", counted("merge", merge))
    rows = run_kernel_bench(
        {
            "interpret": True,
            "cases": ["tome_vit_e2e"],
            "vit_model": "vit_tiny_patch16_224",
            "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
            "vit_batch": 2,
            "vit_r": 3,
            "warmup": 0,
            "repeats": 1,
        }
    )
    assert calls["match"] == calls["merge"] == 2 * 2  # 2 blocks x (first run + 1 timed run)
    triton_row = next(r for r in rows if r["backend"] == "triton")
    assert triton_row["max_abs_diff"] < 1e-4 and triton_row["img_per_s"] > 0


if not IN_INTERPRETER:  # collected in the subprocess only
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_triton_interpreter"]:
        del globals()[_name]
