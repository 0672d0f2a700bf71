"""Triton low-rank projection kernels and the fused GaLore-AdamW step against the reference,
on CPU under ``TRITON_INTERPRET=1`` (in a subprocess when Triton was imported without it;
see ``tests/kernels/test_tome_kernels.py``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _interpreter_active() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard

    return type(standard.zeros_like).__name__ == "InterpretedFunction"


IN_INTERPRETER = _interpreter_active()

import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from repo import ROOT  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from vleff.kernels import lowrank  # noqa: E402
from vleff.kernels.galore_step import galore_adam_step  # noqa: E402


def test_kernels_under_triton_interpreter():
    if IN_INTERPRETER:
        pytest.skip("already running under TRITON_INTERPRET=1: the tests below ran in-process")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore"]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# (grad dtype, proj dtype): fp32, the usual GaLore mix (16-bit grad, fp32 projector), pure 16-bit
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
]
EPS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, cols] with orthonormal columns (rows >= cols)."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0].float()


def _projector(m: int, n: int, rank: int, side: str, gen: torch.Generator) -> torch.Tensor:
    return _orthonormal(n, rank, gen).T.contiguous() if side == "right" else _orthonormal(m, rank, gen)


@SETTINGS
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    rank_frac=st.floats(0, 1),
    side=st.sampled_from(["left", "right"]),
    dtypes=st.sampled_from(DTYPE_PAIRS),
    transposed=st.booleans(),
)
def test_project_and_back_equal_reference(seed, m, n, rank_frac, side, dtypes, transposed):
    gen = torch.Generator().manual_seed(seed)
    rank = 1 + round(rank_frac * (min(m, n) - 1))
    grad_dtype, proj_dtype = dtypes
    grad = torch.randn(m, n, generator=gen)
    if transposed:  # a non-contiguous view: strides, not copies
        grad = torch.randn(n, m, generator=gen).T
    grad = grad.to(grad_dtype)
    proj = _projector(m, n, rank, side, gen).to(proj_dtype)

    low = lowrank.project(grad, proj, side, backend="triton")
    ref_low = lowrank.project_reference(grad.double(), proj.double(), side)
    assert low.dtype == torch.promote_types(grad_dtype, proj_dtype)
    assert low.shape == ref_low.shape
    # inputs are exact in fp64; only the output rounding and fp32 accumulation differ
    k = n if side == "right" else m
    eps = EPS[low.dtype]
    torch.testing.assert_close(low.double(), ref_low, atol=eps * 4 * k**0.5, rtol=eps * 2)

    back = lowrank.project_back(low, proj, side, backend="triton")
    ref_back = lowrank.project_back_reference(low.double(), proj.double(), side)
    assert back.shape == (m, n)
    torch.testing.assert_close(back.double(), ref_back, atol=eps * 4 * rank**0.5, rtol=eps * 2)
    if dtypes == (torch.float32, torch.float32):  # same dtype: against the fp32 reference itself
        torch.testing.assert_close(low, lowrank.project(grad, proj, side, backend="torch"))


@pytest.mark.parametrize("side,shape", [("right", (33, 17)), ("left", (17, 33))])
def test_full_rank_round_trip_is_identity(side, shape):
    gen = torch.Generator().manual_seed(0)
    m, n = shape
    rank = min(m, n)
    proj = _projector(m, n, rank, side, gen)
    grad = torch.randn(m, n, generator=gen)
    back = lowrank.project_back(lowrank.project(grad, proj, side, backend="triton"), proj, side, backend="triton")
    torch.testing.assert_close(back, grad, atol=2e-5, rtol=1e-5)


def test_projection_rejects_mismatched_shapes():
    from vleff.kernels.triton_ops import project_back_triton, project_triton

    grad = torch.randn(8, 6)
    with pytest.raises(ValueError, match="does not fit proj"):
        project_triton(grad, torch.randn(3, 5), "right")
    with pytest.raises(ValueError, match="does not fit proj"):
        project_back_triton(torch.randn(8, 3), torch.randn(4, 6), "right")
    with pytest.raises(ValueError, match="side="):
        project_triton(grad, torch.randn(3, 6), "up")
    with pytest.raises(ValueError, match="2-D"):
        project_triton(grad[None], torch.randn(3, 6), "right")


def test_fp64_falls_back_to_the_reference():
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(9, 7, generator=gen, dtype=torch.float64)
    proj = _projector(9, 7, 3, "right", gen).double()
    assert torch.equal(lowrank.project(grad, proj, "right", backend="triton"), grad @ proj.T)


# ----------------------------------------------------------------------------- fused step

HYPER = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, scale=0.25)


@pytest.mark.parametrize("side,shape", [("right", (37, 20)), ("left", (20, 37))])
@pytest.mark.parametrize(
    "param_dtype,grad_dtype",
    [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)],
)
def test_fused_galore_step_equals_reference(side, shape, param_dtype, grad_dtype):
    gen = torch.Generator().manual_seed(2)
    m, n = shape
    rank = 6
    proj = _projector(m, n, rank, side, gen)
    low = (m, rank) if side == "right" else (rank, n)
    w0 = torch.randn(m, n, generator=gen).to(param_dtype)
    states = {b: [w0.clone(), torch.zeros(low), torch.zeros(low)] for b in ("torch", "triton")}
    for step in range(1, 4):
        grad = torch.randn(m, n, generator=gen).to(grad_dtype)
        for backend, (w, exp_avg, exp_avg_sq) in states.items():
            galore_adam_step(w, grad, proj, exp_avg, exp_avg_sq, side=side, step=step, backend=backend, **HYPER)
    (w_ref, m_ref, v_ref), (w, m_, v) = states["torch"], states["triton"]
    torch.testing.assert_close(m_, m_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v, v_ref, atol=1e-7, rtol=1e-5)
    if param_dtype == torch.float32:
        torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    else:  # each backend rounds the new weight once per step (the interpreter truncates, torch rounds to
        # nearest) and the two paths drift apart by several bf16 ulps: this tolerance checks the Adam
        # path, not the decay (a second decay passes it); test_fused_step_on_bf16_weights_decays_exactly_once pins that
        torch.testing.assert_close(w.float(), w_ref.float(), atol=3e-2, rtol=2e-2)
    assert not torch.equal(w, w0)


def test_fused_step_without_decay_moves_by_scaled_adam_direction():
    # an independent hand computation of the first step: m = (1-b1) R, v = (1-b2) R^2, so the
    # normalised update is R / (|R| + eps') = sign(R) (up to eps), back-projected and scaled
    gen = torch.Generator().manual_seed(4)
    m, n, rank = 24, 16, 4
    proj = _projector(m, n, rank, "right", gen)
    grad = torch.randn(m, n, generator=gen)
    w = torch.zeros(m, n)
    exp_avg, exp_avg_sq = torch.zeros(m, rank), torch.zeros(m, rank)
    galore_adam_step(
        w,
        grad,
        proj,
        exp_avg,
        exp_avg_sq,
        side="right",
        step=1,
        lr=0.1,
        betas=(0.9, 0.999),
        eps=1e-30,
        weight_decay=0.0,
        scale=0.5,
        backend="triton",
    )
    expected = -0.1 * 0.5 * torch.sign(grad @ proj.T) @ proj
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-5)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 unit in the last place at ``|x|`` (8 significant bits): 2^(e - 8) for x = f·2^e, f in [0.5, 1)."""
    _, exponent = torch.frexp(x.double())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exponent - 8)


def _bf16_truncate(x: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16 by dropping the low 16 bits (round toward zero), what Triton's interpreter
    stores; compiled Triton and torch round to nearest."""
    bits = x.float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_step_on_bf16_weights_decays_exactly_once(backend):
    """A zero gradient leaves only the decoupled decay: one step must give w·(1 − lr·wd)
    rounded once to bf16 (within one ulp; exactly the rounding the backend does), so a
    kernel decaying twice (w·0.81 at lr·wd = 0.1, 10 % off) cannot pass."""
    gen = torch.Generator().manual_seed(6)
    m, n, rank = 37, 20, 6
    proj = _projector(m, n, rank, "right", gen)
    w0 = (torch.randn(m, n, generator=gen) * torch.logspace(-3, 2, n)).to(torch.bfloat16)
    w = w0.clone()
    exp_avg, exp_avg_sq = torch.zeros(m, rank), torch.zeros(m, rank)
    lr, wd = 0.5, 0.2  # lr·wd = 0.1
    galore_adam_step(
        w,
        torch.zeros(m, n, dtype=torch.bfloat16),
        proj,
        exp_avg,
        exp_avg_sq,
        side="right",
        step=1,
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=wd,
        scale=0.25,
        backend=backend,
    )
    exact = w0.double() * (1 - lr * wd)
    assert bool(((w.double() - exact).abs() < _bf16_ulp(exact)).all())
    in_fp32 = w0.float() * torch.tensor(1 - lr * wd, dtype=torch.float32)  # the kernel's arithmetic
    rounded = _bf16_truncate(in_fp32) if backend == "triton" and not w.is_cuda else in_fp32.to(torch.bfloat16)
    assert torch.equal(w, rounded)
    assert not torch.any(exp_avg) and not torch.any(exp_avg_sq)


def test_fused_step_rejects_bad_state():
    w = torch.zeros(8, 6)
    proj = torch.zeros(3, 6)
    with pytest.raises(ValueError, match="exp_avg must be float32 of shape"):
        galore_adam_step(
            w, w, proj, torch.zeros(6, 3), torch.zeros(8, 3), side="right", step=1, backend="triton", **HYPER
        )
    with pytest.raises(ValueError, match="step=0"):
        galore_adam_step(
            w, w, proj, torch.zeros(8, 3), torch.zeros(8, 3), side="right", step=0, backend="triton", **HYPER
        )
    with pytest.raises(ValueError, match="proj shape"):
        galore_adam_step(
            w, w, proj, torch.zeros(8, 3), torch.zeros(8, 3), side="left", step=1, backend="triton", **HYPER
        )


# ----------------------------------------------------------------------------- FLOPs, ops


def test_flop_counts_equal_the_reference_matmuls():
    import vleff.kernels.flops  # noqa: F401

    gen = torch.Generator().manual_seed(3)
    for side, (m, n) in (("right", (20, 12)), ("left", (12, 20))):
        rank = 4
        proj = _projector(m, n, rank, side, gen)
        grad = torch.randn(m, n, generator=gen)
        counts = {}
        for backend in ("torch", "triton"):
            with FlopCounterMode(display=False) as fc:
                low = lowrank.project(grad, proj, side, backend=backend)
                lowrank.project_back(low, proj, side, backend=backend)
            counts[backend] = fc.get_total_flops()
        assert counts["torch"] == counts["triton"] == 2 * 2 * m * n * rank
        low_shape = (m, rank) if side == "right" else (rank, n)
        with FlopCounterMode(display=False) as fc:
            galore_adam_step(
                torch.zeros(m, n),
                grad,
                proj,
                torch.zeros(low_shape),
                torch.zeros(low_shape),
                side=side,
                step=1,
                backend="triton",
                **HYPER,
            )
        assert fc.get_total_flops() == 4 * m * n * rank


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(5)
    grad, proj = torch.randn(10, 8, generator=gen), _projector(10, 8, 3, "right", gen)
    low = torch.randn(10, 3, generator=gen)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.vleff.lowrank_project.default, (grad, proj, "right"), test_utils=tests)
    torch.library.opcheck(torch.ops.vleff.lowrank_project_back.default, (low, proj, "right"), test_utils=tests)
    args = (
        torch.randn(10, 8),
        grad,
        proj,
        torch.zeros(10, 3),
        torch.zeros(10, 3),
        "right",
        1,
        1e-2,
        0.9,
        0.99,
        1e-8,
        0.0,
        0.25,
    )
    torch.library.opcheck(torch.ops.vleff.galore_adam_step.default, args, test_utils=tests)


if not IN_INTERPRETER:  # collected in the subprocess only
    for _name in [n for n in list(globals()) if n.startswith("test_") and n != "test_kernels_under_triton_interpreter"]:
        del globals()[_name]
