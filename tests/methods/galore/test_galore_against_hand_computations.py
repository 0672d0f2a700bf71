"""GaLore pinned against hand computations (issue 12: 5, 6).

* Projection side of a **square** gradient: the paper's rule (and vleff's docs: "right ones when
  ``m >= n``") projects ``R = G Pᵀ`` with ``P = Vh[:r]``; checked on a gradient built from known
  singular vectors, and in the optimizer's state.
* The step (reference and fused Triton kernel) against an fp64 hand formula (hypothesis), and
  with **bf16 weights** in a case where the update is many bf16 ulps: the result must equal the
  fp32 step rounded once to bf16 (a kernel that drops the update of bf16 weights fails).
  The Triton kernel runs on CPU under ``TRITON_INTERPRET=1`` in a subprocess.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _interpreter_active() -> bool:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard

    return type(standard.zeros_like).__name__ == "InterpretedFunction"


IN_INTERPRETER = _interpreter_active()

from repo import ROOT  # noqa: E402
from vleff.memory.galore import GaLoreAdamW, galore_projection  # noqa: E402

from vleff.kernels.galore_step import galore_adam_step  # noqa: E402


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def _known_svd(m: int, n: int, gen: torch.Generator):
    """G = U diag(s) Vᵀ with known factors and well separated singular values."""
    k = min(m, n)
    u, v = _orthonormal(m, k, gen), _orthonormal(n, k, gen)
    s = torch.tensor([2.0**-i for i in range(k)], dtype=torch.float64) * 10
    return (u * s) @ v.T, u, v


# --- 5: the projection side of a square gradient ---------------------------------------------
def test_square_gradient_projects_on_the_right_singular_vectors():
    gen = torch.Generator().manual_seed(0)
    g, u, v = _known_svd(12, 12, gen)
    r = 3
    proj, right = galore_projection(g.float(), r)
    assert right is True and tuple(proj.shape) == (r, 12)  # P = Vh[:r], R = G Pᵀ is [m, r]
    # P spans the top right singular vectors (signs are free): Pᵀ P = V_r V_rᵀ
    torch.testing.assert_close(proj.double().T @ proj.double(), v[:, :r] @ v[:, :r].T, atol=1e-5, rtol=0)
    # and not the left ones (a square matrix has both shapes; the two subspaces differ here)
    assert (proj.double().T @ proj.double() - u[:, :r] @ u[:, :r].T).abs().max() > 0.1


def test_galore_optimizer_step_on_a_square_weight_by_hand():
    gen = torch.Generator().manual_seed(1)
    g, _, v = _known_svd(10, 10, gen)
    w0 = torch.randn(10, 10, generator=gen)
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.float()
    lr, scale, r = 0.1, 0.5, 2
    opt = GaLoreAdamW([p], lr=lr, rank=r, scale=scale, weight_decay=0.0, eps=1e-30)
    opt.step()
    state = opt.state[p]
    assert state["proj_right"] is True and tuple(state["exp_avg"].shape) == (10, r)
    # first Adam step: N = R / |R| = sign(R) with R = G Pᵀ; the update is -lr·scale·N P
    vr = v[:, :r].T  # [r, n]; the sign of each row cancels in sign(G Pᵀ) P
    expected = w0.double() - lr * scale * torch.sign(g @ vr.T) @ vr
    torch.testing.assert_close(p.detach().double(), expected, atol=1e-5, rtol=1e-5)


# --- the step against an fp64 hand formula -----------------------------------------------------
def _hand_step(w, g, proj, side, steps, lr, b1, b2, eps, wd, scale):
    """fp64 GaLore-AdamW (torch AdamW's formula in the projected space) over a list of gradients."""
    w, proj = w.double(), proj.double()
    m = v = None
    for t, gt in enumerate(steps, start=1):
        r = gt.double() @ proj.T if side == "right" else proj.T @ gt.double()
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1**t)) / (v.sqrt() / math.sqrt(1 - b2**t) + eps)
        u = n @ proj if side == "right" else proj @ n
        w = w * (1 - lr * wd) - lr * scale * u
    return w


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    rank=st.integers(1, 6),
    lr=st.floats(1e-4, 1e-1),
    wd=st.floats(0, 0.2),
    scale=st.floats(0.1, 2.0),
)
def test_reference_step_equals_the_hand_formula(seed, m, n, rank, lr, wd, scale):
    gen = torch.Generator().manual_seed(seed)
    side = "right" if m >= n else "left"
    rank = min(rank, m, n)
    proj = (_orthonormal(n, rank, gen).T if side == "right" else _orthonormal(m, rank, gen)).float().contiguous()
    low = (m, rank) if side == "right" else (rank, n)
    w = torch.randn(m, n, generator=gen)
    grads = [torch.randn(m, n, generator=gen) for _ in range(3)]
    expected = _hand_step(w, None, proj, side, grads, lr, 0.9, 0.99, 1e-8, wd, scale)
    exp_avg, exp_avg_sq = torch.zeros(low), torch.zeros(low)
    for t, g in enumerate(grads, start=1):
        galore_adam_step(
            w,
            g,
            proj,
            exp_avg,
            exp_avg_sq,
            side=side,
            step=t,
            lr=lr,
            betas=(0.9, 0.99),
            eps=1e-8,
            weight_decay=wd,
            scale=scale,
            backend="torch",
        )
    torch.testing.assert_close(w.double(), expected, atol=1e-5, rtol=1e-5)


# --- 6: bf16 weights, an update of many ulps ---------------------------------------------------
def _bf16_case(side: str):
    gen = torch.Generator().manual_seed(7)
    m, n, rank = (40, 24, 6) if side == "right" else (24, 40, 6)
    proj = (_orthonormal(n, rank, gen).T if side == "right" else _orthonormal(m, rank, gen)).float().contiguous()
    w = (0.01 * torch.randn(m, n, generator=gen)).to(torch.bfloat16)  # small weights: fine bf16 grid
    grad = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    hyper = dict(lr=0.02, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, scale=0.5)
    expected32 = _hand_step(
        w.float(),
        None,
        proj,
        side,
        [grad.float()],
        hyper["lr"],
        *hyper["betas"],
        hyper["eps"],
        hyper["weight_decay"],
        hyper["scale"],
    ).float()
    return w, grad, proj, hyper, expected32, (m, rank) if side == "right" else (rank, n)


def _check_bf16_step(backend: str, side: str) -> None:
    w, grad, proj, hyper, expected32, low = _bf16_case(side)
    before = w.clone()
    exp_avg, exp_avg_sq = torch.zeros(low), torch.zeros(low)
    galore_adam_step(w, grad, proj, exp_avg, exp_avg_sq, side=side, step=1, backend=backend, **hyper)
    expected = expected32.to(torch.bfloat16)
    # the case is meaningful: the update is many bf16 ulps of the weights
    ulp = torch.finfo(torch.bfloat16).eps * before.float().abs().clamp_min(1e-3)
    moved = (expected.float() - before.float()).abs() / ulp
    assert float(moved.median()) > 20, float(moved.median())
    # one rounding of the fp32 result: at most one bf16 ulp apart (fp32 sums in another order)
    err = (w.float() - expected.float()).abs()
    assert bool((err <= torch.finfo(torch.bfloat16).eps * expected.float().abs() + 1e-7).all()), float(err.max())
    assert w.dtype == torch.bfloat16


@pytest.mark.parametrize("side", ["right", "left"])
def test_bf16_weights_reference_step_is_the_rounded_fp32_step(side):
    _check_bf16_step("torch", side)


@pytest.mark.parametrize("side", ["right", "left"])
def test_triton_bf16_weights_step_is_the_rounded_fp32_step(side):
    if not IN_INTERPRETER:
        pytest.skip("runs in the interpreter subprocess (test_triton_kernels_in_interpreter)")
    _check_bf16_step("triton", side)


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    if IN_INTERPRETER:
        pytest.skip("already under TRITON_INTERPRET=1")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        __file__,
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore",
        "-k",
        "test_triton_bf16",
    ]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(ROOT),
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
