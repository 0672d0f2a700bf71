"""The kernel dispatcher's rule, with a stub device (issue 12: 7).

The rule (``vleff/kernels/dispatch.py``): ``backend`` argument > ``VLEFF_KERNELS`` > auto; auto is
Triton exactly for CUDA tensors when Triton imports and ``TRITON_INTERPRET`` is not ``1``. Checked
against an independent table over every combination, on a stub "CUDA tensor" (no GPU needed);
``triton_available`` records import failures and lets other errors through; the decision is logged
once; ``vleff-bench kernels`` reports what auto picked.
"""

from __future__ import annotations

import builtins
import itertools
import logging
import sys

import pytest
import torch

from vleff.kernels import dispatch


class StubTensor:
    """What the dispatcher reads of a tensor: its device."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"


@pytest.fixture
def clean(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    return monkeypatch


def _expected(arg, env, cuda, interpret, available):
    """The documented rule, written out independently."""
    choice = arg if arg is not None else (env or "auto")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        return "triton" if available else RuntimeError
    return "triton" if cuda and not interpret and available else "torch"


COMBOS = list(
    itertools.product(
        [None, "auto", "torch", "triton"],
        [None, "auto", "torch", "triton"],
        [True, False],
        [True, False],
        [True, False],
    )
)


def test_rule_table_on_a_stub_device(clean):
    picked_triton = 0
    for arg, env, cuda, interpret, available in COMBOS:
        clean.setattr(dispatch, "_triton_importable", available)
        clean.setattr(dispatch, "_triton_reason", None if available else "ImportError: stub")
        if env is None:
            clean.delenv(dispatch.ENV_VAR, raising=False)
        else:
            clean.setenv(dispatch.ENV_VAR, env)
        if interpret:
            clean.setenv("TRITON_INTERPRET", "1")
        else:
            clean.delenv("TRITON_INTERPRET", raising=False)
        tensor = StubTensor("cuda:0" if cuda else "cpu")
        want = _expected(arg, env, cuda, interpret, available)
        case = dict(arg=arg, env=env, cuda=cuda, interpret=interpret, available=available)
        if want is RuntimeError:
            with pytest.raises(RuntimeError, match="not importable"):
                dispatch.kernel_backend(tensor, arg)
            continue
        assert dispatch.kernel_backend(tensor, arg) == want, case
        picked_triton += want == "triton"
    assert picked_triton > 0


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports(clean):
    clean.setattr(dispatch, "_triton_importable", True)
    clean.setattr(dispatch, "_triton_reason", None)
    assert dispatch.kernel_backend(StubTensor("cuda:0")) == "triton"
    backend, reason = dispatch.auto_backend(StubTensor("cuda:0"))
    assert backend == "triton" and "CUDA" in reason
    assert dispatch.auto_backend(torch.zeros(1)) == ("torch", "auto: tensors on cpu, not CUDA")


def test_auto_keeps_the_reference_where_it_was_measured_faster_on_cuda(clean):
    """GaLore's back-projection: cuBLAS beat the Triton kernel on an H200, so auto picks torch
    for it (and only for it); forcing Triton still runs Triton."""
    clean.setattr(dispatch, "_triton_importable", True)
    clean.setattr(dispatch, "_triton_reason", None)
    cuda = StubTensor("cuda:0")
    assert set(dispatch.AUTO_ON_CUDA) == {"galore_project_back"}
    backend, reason = dispatch.auto_backend(cuda, kernel="galore_project_back")
    assert backend == "torch" and "measured" in reason
    assert dispatch.kernel_backend(cuda, kernel="galore_project_back") == "torch"
    assert dispatch.kernel_backend(cuda, "triton", kernel="galore_project_back") == "triton"
    assert dispatch.kernel_backend(cuda, kernel="galore_project") == "triton"
    assert dispatch.auto_backend(torch.zeros(1), kernel="galore_project_back")[0] == "torch"


def test_project_back_asks_for_its_measured_exception(clean, monkeypatch):
    from vleff.kernels import lowrank

    asked = []
    monkeypatch.setattr(lowrank, "kernel_backend", lambda t, b=None, kernel=None: asked.append(kernel) or "torch")
    low, proj = torch.randn(4, 2), torch.randn(2, 3)
    torch.testing.assert_close(lowrank.project_back(low, proj, "right"), low @ proj)
    assert asked == ["galore_project_back"]


def test_bad_backend_names_are_refused(clean):
    with pytest.raises(ValueError, match="backend='cuda'"):
        dispatch.kernel_backend(torch.zeros(1), "cuda")
    clean.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VLEFF_KERNELS='fast'"):
        dispatch.kernel_backend(torch.zeros(1))


def test_triton_import_failure_is_recorded(clean):
    clean.setattr(dispatch, "_triton_importable", None)
    clean.setattr(dispatch, "_triton_reason", None)
    clean.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert dispatch.triton_available() is False
    reason = dispatch.triton_unavailable_reason()
    assert reason is not None and reason.split(":")[0] in ("ImportError", "ModuleNotFoundError"), reason
    backend, why = dispatch.auto_backend(StubTensor("cuda:0"))
    assert backend == "torch" and "not importable" in why and reason in why
    with pytest.raises(RuntimeError, match="not importable"):
        dispatch.kernel_backend(torch.zeros(1), "triton")


def test_other_errors_during_the_triton_import_are_not_swallowed(clean):
    clean.setattr(dispatch, "_triton_importable", None)
    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ZeroDivisionError("a bug inside the import")
        return real_import(name, *args, **kwargs)

    clean.setattr(builtins, "__import__", failing)
    with pytest.raises(ZeroDivisionError):
        dispatch.triton_available()


def test_decision_is_logged_once_per_process(clean, caplog):
    caplog.set_level(logging.INFO, logger="vleff.kernels.dispatch")
    x = torch.zeros(3)
    for _ in range(5):
        assert dispatch.kernel_backend(x) == "torch"
    records = [r for r in caplog.records if r.name == "vleff.kernels.dispatch"]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].getMessage() == "vleff kernels: backend 'torch' (auto: tensors on cpu, not CUDA)"
    # a different decision (forced) is logged once too; repeating either logs nothing more
    dispatch.kernel_backend(x, "torch")
    dispatch.kernel_backend(x, "torch")
    dispatch.kernel_backend(x)
    messages = [r.getMessage() for r in caplog.records if r.name == "vleff.kernels.dispatch"]
    assert messages == [
        "vleff kernels: backend 'torch' (auto: tensors on cpu, not CUDA)",
        "vleff kernels: backend 'torch' (forced by backend argument)",
    ]


def test_a_tome_model_logs_its_backend_once(clean, caplog):
    import tiny_models as tm

    from vleff import apply_tome

    caplog.set_level(logging.INFO, logger="vleff.kernels.dispatch")
    model = apply_tome(tm.timm_vit().eval(), r=2)
    with torch.no_grad():
        model(tm.images())
        model(tm.images())
    messages = [r.getMessage() for r in caplog.records if r.name == "vleff.kernels.dispatch"]
    assert messages == ["vleff kernels: backend 'torch' (auto: tensors on cpu, not CUDA)"]


def test_kernel_bench_reports_the_auto_backend(clean, monkeypatch):
    from vleff.profile import kernels_bench

    cfg = {
        "device": "cpu",
        "cases": ["tome_match", "galore_project", "tome_vit_e2e"],
        "tome_batch": 1,
        "tome_tokens": 9,
        "tome_channels": 8,
        "lowrank_m": 8,
        "lowrank_n": 6,
        "lowrank_rank": 2,
        "vit_model": "vit_tiny_patch16_224",
        "vit_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1},
        "vit_batch": 1,
        "vit_r": 2,
        "warmup": 0,
        "repeats": 1,
    }
    rows = kernels_bench.run_kernel_bench(cfg)
    assert {r["case"] for r in rows} == {"tome_match", "galore_project", "tome_vit_e2e"}
    for row in rows:
        assert row["auto_backend"] == "torch" and row["auto_reason"] == "auto: tensors on cpu, not CUDA", row
    # the column follows the dispatcher: with a stubbed decision the bench reports Triton
    monkeypatch.setattr(kernels_bench, "auto_backend", lambda t, kernel=None: ("triton", "auto: stub"))
    rows = kernels_bench.run_kernel_bench(cfg)
    assert [(r["auto_backend"], r["auto_reason"]) for r in rows] == [("triton", "auto: stub")] * 3
