"""GaLore: optimizer maths against independent computations, selection, Lightning conversion and resume."""

from __future__ import annotations

import copy
import math

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.kernels.lowrank import project, project_back
from vleff.memory import (
    GaLoreAdamW,
    galore_from_optimizer,
    galore_param_groups,
    galore_projection,
    select_galore_params,
)
from vleff.memory import galore as galore_module


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("decoupled", [True, False])
def test_group_without_projection_equals_torch_adam(decoupled):
    a, b = _mlp(), _mlp()
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    ours = GaLoreAdamW(a.parameters(), rank=None, decoupled_weight_decay=decoupled, **kw)
    ref = torch.optim.AdamW(b.parameters(), **kw) if decoupled else torch.optim.Adam(b.parameters(), **kw)
    _train(a, ours, 6)
    _train(b, ref, 6)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    proj_type=st.sampled_from(["std", "reverse_std", "left", "right"]),
    seed=st.integers(0, 1000),
)
def test_full_rank_round_trip_is_identity(m, n, proj_type, seed):
    grad = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    proj, right = galore_projection(grad, rank=max(m, n) + 3, proj_type=proj_type)
    side = "right" if right else "left"
    back = project_back(project(grad, proj, side), proj, side)
    torch.testing.assert_close(back, grad, atol=1e-5, rtol=1e-5)


def test_projection_sides_follow_the_shape():
    tall, wide = torch.randn(10, 4), torch.randn(4, 10)
    assert galore_projection(tall, 2)[1] is True  # m >= n: right, P = Vh[:r]  [r, n]
    assert galore_projection(tall, 2)[0].shape == (2, 4)
    assert galore_projection(wide, 2)[1] is False  # m < n: left, P = U[:, :r]  [m, r]
    assert galore_projection(wide, 2)[0].shape == (4, 2)
    assert galore_projection(tall, 2, "reverse_std")[1] is False


@pytest.mark.parametrize("shape", [(40, 8), (8, 40)])
def test_projection_storage_is_only_the_kept_vectors(shape):
    # the state must not keep the full SVD factor alive through a view (optimizer-state memory)
    from vleff.profile import optimizer_state_bytes

    w = torch.nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    w.grad = torch.randn(*shape)
    opt.step()
    proj = opt.state[w]["proj"]
    assert proj.untyped_storage().nbytes() == proj.numel() * 4 == 2 * 8 * 4
    assert optimizer_state_bytes(opt) == (2 * 40 * 2 + 2 * 8) * 4 + 4  # moments [40, 2] x2, P, step


@pytest.mark.parametrize("shape,rank,expect", [((12, 6), 3, (12, 3)), ((5, 9), 2, (2, 9)), ((4, 4), 10, (4, 4))])
def test_moments_live_in_rank_space(shape, rank, expect):
    w = torch.nn.Parameter(torch.randn(*shape))
    opt = GaLoreAdamW([{"params": [w], "rank": rank}], lr=1e-2)
    w.grad = torch.randn(*shape)
    opt.step()
    st_ = opt.state[w]
    assert st_["exp_avg"].shape == expect and st_["exp_avg_sq"].shape == expect
    assert st_["exp_avg"].dtype == torch.float32
    assert min(expect) == min(rank, *shape)  # the rank dimension is r (clamped to the matrix)


def test_one_projected_step_matches_hand_computation():
    torch.manual_seed(3)
    w0 = torch.randn(8, 5, dtype=torch.float64)
    g = torch.randn(8, 5, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone().float())
    lr, wd, scale, eps, (b1, b2), r = 0.1, 0.05, 0.25, 1e-8, (0.9, 0.999), 2
    opt = GaLoreAdamW([{"params": [w], "rank": r}], lr=lr, weight_decay=wd, scale=scale, eps=eps, betas=(b1, b2))
    w.grad = g.float()
    opt.step()
    # independent: SVD, R = G P^T, Adam at step 1, back-projection, decoupled decay
    _, _, vh = torch.linalg.svd(g.float().double(), full_matrices=False)
    p = vh[:r]
    low = g @ p.T
    m, v = (1 - b1) * low, (1 - b2) * low * low
    n = (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)
    expect = w0 * (1 - lr * wd) - lr * scale * (n @ p)
    torch.testing.assert_close(w.detach().double(), expect, atol=1e-5, rtol=0)


def test_svd_refresh_exactly_every_T_steps(monkeypatch):
    calls: list[int] = []
    real = galore_module.galore_projection
    w = torch.nn.Parameter(torch.randn(6, 4))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=1e-2)

    def counting(grad, rank, proj_type="std", svd="full"):
        calls.append(int(opt.state[w]["step"].item()))
        return real(grad, rank, proj_type, svd)

    monkeypatch.setattr(galore_module, "galore_projection", counting)
    for _ in range(10):
        w.grad = torch.randn(6, 4)
        opt.step()
    assert calls == [1, 4, 7, 10]


def test_state_dict_loads_with_weights_only(tmp_path):
    model = _mlp()
    opt = GaLoreAdamW(galore_param_groups(model, rank=2), lr=1e-2)
    _train(model, opt, 2)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    projected = [s for s in loaded["state"].values() if "proj" in s]
    assert projected and all(torch.is_tensor(s["proj"]) for s in projected)
    other = GaLoreAdamW(galore_param_groups(_mlp(), rank=2), lr=1e-2)
    other.load_state_dict(loaded)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_resume_with_low_precision_params_keeps_fp32_state_and_continues_exactly(tmp_path, dtype):
    model = _mlp().to(dtype)
    opt = GaLoreAdamW(galore_param_groups(model, rank=2, update_proj_gap=3), lr=1e-2, weight_decay=0.1)
    _train(model, opt, 4)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed_model = copy.deepcopy(model)
    resumed = GaLoreAdamW(galore_param_groups(resumed_model, rank=2, update_proj_gap=3), lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))

    for p, q in zip(model.parameters(), resumed_model.parameters()):
        s, t = opt.state[p], resumed.state[q]
        assert s.keys() == t.keys()
        for key, value in s.items():
            if torch.is_tensor(value):
                assert t[key].dtype == value.dtype, (key, t[key].dtype, value.dtype)
                assert torch.equal(t[key], value), key
            else:
                assert t[key] == value
        if "proj" in s:  # projected: low-rank moments and projector stay fp32
            assert s["proj"].dtype == s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32
        else:  # unprojected: full-size moments in the parameter's dtype, as during training
            assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == dtype
    assert sum("proj" in s for s in resumed.state.values()) == 2

    # the next steps include an SVD refresh (step 7); both runs must stay bit-identical
    _train(model, opt, 4, seed=2)
    _train(resumed_model, resumed, 4, seed=2)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert p.dtype == dtype
        assert torch.equal(p, q)


def test_selection_open_clip_and_hf_clip():
    names = select_galore_params(tm.open_clip_model())
    assert any(n.endswith("attn.in_proj_weight") for n in names)
    assert any(n.endswith("mlp.c_fc.weight") for n in names)
    assert "text_projection" in names
    assert not any("embedding" in n or "conv1" in n or "ln_" in n for n in names)
    hf = select_galore_params(tm.hf_clip_model())
    assert any(n.endswith("q_proj.weight") for n in hf) and "visual_projection.weight" in hf
    assert not any("embedding" in n for n in hf)
    assert select_galore_params(tm.open_clip_model(), targets=[r"mlp\.c_fc"]) == [n for n in names if "mlp.c_fc" in n]


def test_bad_inputs_raise_clear_errors():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="rank=0"):
        GaLoreAdamW([w], rank=0)
    with pytest.raises(ValueError, match="rank=-3"):
        GaLoreAdamW([{"params": [w], "rank": -3}])
    with pytest.raises(ValueError, match="update_proj_gap=0"):
        GaLoreAdamW([w], rank=2, update_proj_gap=0)
    with pytest.raises(ValueError, match="proj_type='diag'"):
        GaLoreAdamW([w], rank=2, proj_type="diag")
    with pytest.raises(ValueError, match="matched no parameter.*nothing_here"):
        select_galore_params(_mlp(), targets="nothing_here")
    with pytest.raises(TypeError, match="SGD"):
        galore_from_optimizer(torch.optim.SGD(_mlp().parameters(), lr=0.1), _mlp())
    from vleff.callbacks import GaLore

    with pytest.raises(ValueError, match="rank=0"):
        GaLore(rank=0)


def test_conversion_keeps_groups_and_hyperparameters():
    model = tm.open_clip_model()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.2, "name": "decay"}, {"params": rest, "weight_decay": 0.0}],
        lr=5e-4,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    new = galore_from_optimizer(opt, model, rank=4)
    assert len(new.param_groups) == 2 and new.param_groups[0]["name"] == "decay"
    for old_g, new_g in zip(opt.param_groups, new.param_groups):
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert new_g[key] == old_g[key]
        assert new_g["params"] == old_g["params"]
    assert any(new.param_groups[0]["project"]) and not any(new.param_groups[1]["project"])


# ---------------------------------------------------------------- Lightning


def _fit(tmp_path, epochs, ckpt_in=None, ckpt_out=None, weights_only=None):
    import lightning.pytorch as pl
    import tiny_lightning as tl

    from vleff.callbacks import GaLore

    class Scheduled(tl.TinyClassifier):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=2e-3, betas=(0.85, 0.99), weight_decay=0.05)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    pl.seed_everything(0)
    module = Scheduled(depth=2)
    trainer = tl.trainer(tmp_path, callbacks=[GaLore(rank=4, update_proj_gap=3)], max_epochs=epochs)
    kwargs = {} if weights_only is None else {"weights_only": weights_only}
    trainer.fit(module, tl.loader(n=16, batch_size=4), ckpt_path=ckpt_in, **kwargs)
    if ckpt_out is not None:
        trainer.save_checkpoint(ckpt_out)
    return module, trainer


def test_callback_converts_and_resume_reproduces_uninterrupted_run(tmp_path):
    full, trainer = _fit(tmp_path / "a", epochs=2)
    opt = trainer.optimizers[0]
    assert isinstance(opt, GaLoreAdamW)
    assert opt.param_groups[0]["betas"] == (0.85, 0.99) and opt.param_groups[0]["weight_decay"] == 0.05
    # the LambdaLR kept driving the converted optimizer: 8 steps -> lr = 2e-3 / 9
    assert math.isclose(opt.param_groups[0]["lr"], 2e-3 / 9, rel_tol=1e-9)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is opt
    assert any(s.get("proj") is not None for s in opt.state.values())

    ckpt = tmp_path / "half.ckpt"
    _fit(tmp_path / "b", epochs=1, ckpt_out=ckpt)
    raw = torch.load(ckpt, weights_only=True)  # projections are plain tensors, no objects
    assert any("proj" in s for s in raw["optimizer_states"][0]["state"].values())
    resumed, _ = _fit(tmp_path / "c", epochs=2, ckpt_in=ckpt, weights_only=True)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=name)


def test_mixin_builds_galore_optimizer():
    import lightning.pytorch as pl

    from vleff.callbacks.mixins import GaLoreMixin

    class M(GaLoreMixin, pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()

    opt = M().galore_optimizer(lr=1e-3, rank=2)
    assert isinstance(opt, GaLoreAdamW)
    assert opt.param_groups[0]["rank"] == 2 and len(opt.param_groups[0]["params"]) == 2
    assert opt.param_groups[1]["rank"] is None
    copy.deepcopy(opt.state_dict())
