"""MeZO: the estimate against the true directional derivative, exact restore, a hand-computed
update, the Lightning callback, and 2-process DDP (gloo) for both memory savers."""

from __future__ import annotations

import os
import socket

import pytest
import tiny_models as tm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vleff.memory import MeZO, directions, mezo_from_optimizer, spsa_projected_grad


def _independent_z(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 7))
def test_estimate_equals_directional_derivative_on_quadratic(seed, n):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n + 3, n + 3, generator=g, dtype=torch.float64)
    a = a @ a.T
    b = torch.randn(n + 3, generator=g, dtype=torch.float64)
    w = torch.randn(n, 1, generator=g, dtype=torch.float64)
    v = torch.randn(3, generator=g, dtype=torch.float64)
    params = [w, v]

    def loss():
        theta = torch.cat([w.flatten(), v])
        return 0.5 * theta @ a @ theta + b @ theta

    theta = torch.cat([w.flatten(), v])
    true_grad = a @ theta + b
    z = torch.cat([t.flatten() for t in _independent_z(params, seed)])
    est, _, _ = spsa_projected_grad(params, loss, seed=seed, eps=1e-3)
    assert est.dtype == torch.float64
    assert abs(est.item() - (z @ true_grad).item()) <= 1e-9 * max(1.0, abs((z @ true_grad).item()))


def test_directions_follow_the_documented_contract():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    for (_, z), expect in zip(directions(params, 7), _independent_z(params, 7)):
        torch.testing.assert_close(z, expect, atol=0, rtol=0)


def test_state_dict_keeps_seed_and_step_count_in_the_param_groups():
    """A resumed optimizer continues the seed sequence; the count travels in every param group,
    which a sharded checkpoint keeps (it drops keys beside ``state`` and ``param_groups``)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    opt = MeZO([w], lr=1e-2, seed=11)
    for _ in range(3):
        opt.step(lambda: (w**2).sum())
    saved = opt.state_dict()
    assert [g["mezo"] for g in saved["param_groups"]] == [{"base_seed": 11, "steps_done": 3}]
    kept = {"state": saved["state"], "param_groups": saved["param_groups"]}  # what a sharded save keeps
    fresh = MeZO([torch.nn.Parameter(w.detach().clone())], lr=1e-2, seed=0)
    fresh.load_state_dict(kept)
    assert fresh.current_seed() == 14 and "mezo" not in fresh.param_groups[0]
    # the layout of earlier checkpoints (a top-level "mezo" key) still loads
    old = {**kept, "param_groups": [{k: v for k, v in g.items() if k != "mezo"} for g in kept["param_groups"]]}
    older = MeZO([torch.nn.Parameter(w.detach().clone())], lr=1e-2)
    older.load_state_dict({**old, "mezo": {"base_seed": 11, "steps_done": 3}})
    assert older.current_seed() == 14


def test_a_step_without_closure_is_a_no_op_only_at_lr_zero():
    """torch.distributed.checkpoint initialises optimizer state with ``step()`` at lr 0 and no
    closure: a step of size 0, which changes nothing and is not counted; any other step without
    a closure is refused."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = MeZO([w], lr=0.0, weight_decay=0.1, seed=3)
    assert opt.step() is None
    assert torch.equal(w.detach(), torch.ones(3)) and opt.steps_done == 0
    opt.param_groups[0]["lr"] = 1e-3
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()


def test_perturb_and_restore_leaves_weights_unchanged():
    model = tm.open_clip_model().eval()
    before = [p.detach().clone() for p in model.parameters()]
    imgs, ids = tm.images(2), tm.token_ids(2)

    def loss():
        return (model.encode_image(imgs).sum() - model.encode_text(ids).sum()) ** 2

    spsa_projected_grad(list(model.parameters()), loss, seed=123, eps=1e-3)
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, atol=1e-6, rtol=0)


def test_one_update_equals_hand_computation():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    lr, wd, eps, seed = 0.05, 0.1, 1e-3, 11

    def loss_at(w_, b_):
        return ((x @ w_ + b_).tanh() ** 2).mean()

    w0, b0 = w.detach().clone(), bias.detach().clone()
    opt = MeZO([{"params": [w, bias], "decay": [True, False]}], lr=lr, eps=eps, weight_decay=wd, seed=seed)
    out = opt.step(lambda: loss_at(w, bias))

    zw, zb = _independent_z([w0, b0], seed)
    lp, lm = loss_at(w0 + eps * zw, b0 + eps * zb), loss_at(w0 - eps * zw, b0 - eps * zb)
    g = (lp - lm) / (2 * eps)
    torch.testing.assert_close(w.detach(), w0 * (1 - lr * wd) - lr * g * zw, atol=1e-12, rtol=0)
    torch.testing.assert_close(bias.detach(), b0 - lr * g * zb, atol=1e-12, rtol=0)  # no decay on bias
    torch.testing.assert_close(out, (lp + lm) / 2)
    assert opt.steps_done == 1 and opt.current_seed() == seed + 1
    assert w.grad is None and bias.grad is None


class _TinyNet(torch.nn.Module):
    """Linear, LayerNorm, Linear in float64, named the way MeZO's reference rule reads names."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc = torch.nn.Linear(3, 4, dtype=torch.float64)
        self.layer_norm = torch.nn.LayerNorm(4, dtype=torch.float64)
        torch.nn.init.normal_(self.layer_norm.weight)
        torch.nn.init.normal_(self.layer_norm.bias)
        self.head = torch.nn.Linear(4, 2, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer_norm(self.fc(x)).tanh())


def _reference_mezo_step(
    model: torch.nn.Module, x: torch.Tensor, lr: float, wd: float, eps: float, seed: int
) -> dict[str, torch.Tensor]:
    """One step of MeZO's trainer (large_models/trainer.py, ``zo_update``) on copies of the
    weights: z per parameter in order, ``θ ← θ − lr (g z + wd θ)`` where the name holds neither
    "bias" nor "layer_norm"/"layernorm", ``θ ← θ − lr g z`` otherwise."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p.detach().clone() for p in model.parameters()]
    z = _independent_z(theta, seed)

    def loss_at(values):
        out = torch.func.functional_call(model, dict(zip(names, values)), (x,))
        return out.square().mean()

    g = (loss_at([t + eps * d for t, d in zip(theta, z)]) - loss_at([t - eps * d for t, d in zip(theta, z)])) / (
        2 * eps
    )
    new = {}
    for n, t, d in zip(names, theta, z):
        decays = "bias" not in n and "layer_norm" not in n and "layernorm" not in n
        new[n] = t - lr * (g * d + wd * t) if decays else t - lr * g * d
    return new


@pytest.mark.parametrize("build", ["parameters", "named_parameters", "mezo_from_optimizer"])
def test_default_decay_rule_is_the_reference_one_in_every_path(build):
    """MeZO's trainer decays neither biases nor LayerNorm parameters. The optimizer built
    directly (from ``parameters()`` or ``named_parameters()``) must do what the callback's
    ``mezo_from_optimizer`` does; before the fix the direct optimizer decayed all of them."""
    model = _TinyNet()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lr, wd, eps, seed = 0.05, 0.5, 1e-3, 17
    expect = _reference_mezo_step(model, x, lr, wd, eps, seed)
    if build == "mezo_from_optimizer":
        opt = mezo_from_optimizer(None, model, lr=lr, eps=eps, weight_decay=wd, seed=seed)
    else:
        opt = MeZO(getattr(model, build)(), lr=lr, eps=eps, weight_decay=wd, seed=seed)
    opt.step(lambda: model(x).square().mean())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expect[n], atol=1e-13, rtol=0, msg=n)


def test_named_parameters_get_the_callbacks_decay_flags():
    """From ``named_parameters()`` the direct optimizer marks exactly what the callback's
    conversion marks (embeddings, class/positional embeddings and ``logit_scale`` too); from
    bare ``parameters()`` every tensor below 2-D is undecayed."""
    model = tm.open_clip_model()
    named = MeZO(model.named_parameters(), lr=1e-3, weight_decay=0.1).param_groups[0]
    converted = mezo_from_optimizer(None, model, lr=1e-3, weight_decay=0.1).param_groups[0]
    assert [id(p) for p in named["params"]] == [id(p) for p in converted["params"]]
    assert named["decay"] == converted["decay"] and not all(named["decay"]) and any(named["decay"])
    bare = MeZO(model.parameters(), lr=1e-3, weight_decay=0.1).param_groups[0]
    assert bare["decay"] == [p.ndim >= 2 for p in model.parameters()]


def test_step_saves_nothing_for_backward_and_allocates_no_grads():
    from vleff.profile import optimizer_state_bytes, saved_activation_bytes

    model = tm.open_clip_model()
    opt = mezo_from_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, eps=1e-3)
    imgs, ids = tm.images(2), tm.token_ids(2)

    def closure():
        return (model.encode_image(imgs) * model.encode_text(ids)).sum()

    assert saved_activation_bytes(lambda: opt.step(closure)) == 0
    assert all(p.grad is None for p in model.parameters())
    assert optimizer_state_bytes(opt) == 0


def test_params_subset_and_no_decay_mask():
    model = tm.open_clip_model()
    opt = mezo_from_optimizer(None, model, lr=1e-2, weight_decay=0.1, params=r"visual\.transformer")
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[id(p)] for p in opt.param_groups[0]["params"]]
    assert chosen and all(n.startswith("visual.transformer") for n in chosen)
    for n, d in zip(chosen, opt.param_groups[0]["decay"]):
        assert d == (not (n.endswith("bias") or ".ln_" in n))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: model.encode_image(tm.images(2)).pow(2).sum())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in chosen)


def test_bad_inputs_raise_clear_errors():
    from vleff.callbacks import MeZO as MeZOCallback

    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="eps=0"):
        MeZO([p], eps=0)
    with pytest.raises(ValueError, match="eps=-0.1"):
        MeZOCallback(eps=-0.1)
    with pytest.raises(ValueError, match="needs lr"):
        mezo_from_optimizer(None, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="selected no parameter"):
        mezo_from_optimizer(None, torch.nn.Linear(2, 2), lr=1e-3, params="nope")
    with pytest.raises(ValueError, match="needs a closure"):
        MeZO([p]).step()


# ---------------------------------------------------------------- Lightning


class _Probe:
    """Records the mode the user's training_step ran in."""

    calls: list[tuple[bool, bool]] = []


def _probe_module(n_optimizers: int = 1):
    import tiny_lightning as tl

    class Probed(tl.TinyClassifier):
        def training_step(self, batch, batch_idx):
            _Probe.calls.append((self.training, torch.is_grad_enabled()))
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
            if n_optimizers == 2:
                return [opt, torch.optim.SGD(self.parameters(), lr=0.1)]
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Probed(depth=1)
    module.automatic_optimization = n_optimizers == 1  # Lightning itself needs manual mode for two
    return module


def test_callback_runs_user_training_step_as_mezo(tmp_path):
    import tiny_lightning as tl

    from vleff.callbacks import MeZO as MeZOCallback

    torch.manual_seed(0)
    module = _probe_module()
    before = [p.detach().clone() for p in module.parameters()]
    _Probe.calls.clear()
    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback(eps=1e-3)], max_steps=4)
    trainer.fit(module, tl.loader(n=16, batch_size=4))
    assert trainer.global_step == 4
    assert _Probe.calls == [(False, False)] * 8  # two losses per step, eval mode, no autograd
    assert all(p.grad is None for p in module.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))
    opt = trainer.optimizers[0]
    assert isinstance(opt, MeZO) and opt.steps_done == 4
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)  # StepLR(2, 0.5) stepped 4 times
    assert "training_step" not in vars(module)  # the user's step is back after fit
    from vleff.methods.mezo.lightning import uninstall_mezo

    uninstall_mezo(module)
    assert module.automatic_optimization is True
    assert "mezo/projected_grad" in trainer.callback_metrics


def test_callback_rejects_several_optimizers(tmp_path):
    import tiny_lightning as tl

    from vleff.callbacks import MeZO as MeZOCallback

    # Lightning needs manual optimization for two optimizers, and MeZO refuses manual mode at setup
    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback()], max_steps=1)
    with pytest.raises(ValueError, match="MeZO needs a module with automatic optimization"):
        trainer.fit(_probe_module(n_optimizers=2), tl.loader(n=4, batch_size=4))


class _HookProbe:
    """Callback: counts ``on_before_optimizer_step`` and compares the weights there with the
    weights at the start of the batch (unperturbed) and at its end (updated)."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        probe = self
        self.calls: list[dict] = []

        class _CB(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                probe.start = [p.detach().clone() for p in pl_module.parameters()]

            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                now = [p.detach().clone() for p in pl_module.parameters()]
                # restore is exact up to fp32 rounding; the perturbation is eps * z ~ 1e-3
                unperturbed = all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(now, probe.start))
                probe.calls.append(
                    {
                        "step": trainer.global_step,
                        "unperturbed": unperturbed,
                        "weights": now,
                        "optimizer": type(optimizer).__name__,
                    }
                )

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                probe.calls[-1]["updated"] = any(
                    not torch.equal(p, q) for p, q in zip(pl_module.parameters(), probe.calls[-1]["weights"])
                )

        self.callback = _CB()


def test_on_before_optimizer_step_fires_once_per_step_at_unperturbed_weights(tmp_path):
    import tiny_lightning as tl

    from vleff.callbacks import MeZO as MeZOCallback

    logged: list[tuple[str, float]] = []
    module_hook_calls: list[int] = []

    class Logged(tl.TinyClassifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss, prog_bar=True)
            self.log_dict({"train_loss_x2": 2 * loss, "batch_idx": batch_idx})
            return loss

        def log(self, name, value, *args, **kwargs):
            logged.append((name, float(value)))
            return super().log(name, value, *args, **kwargs)

        def on_before_optimizer_step(self, optimizer):
            module_hook_calls.append(self.trainer.global_step)

    torch.manual_seed(0)
    module = Logged(depth=1)
    probe = _HookProbe()
    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback(eps=1e-3, lr=1e-2), probe.callback], max_steps=3)
    trainer.fit(module, tl.loader(n=16, batch_size=4))

    assert trainer.global_step == 3
    assert [c["step"] for c in probe.calls] == [0, 1, 2]  # once per step, before the step is counted
    assert module_hook_calls == [0, 1, 2]
    assert all(c["unperturbed"] for c in probe.calls)
    assert all(c["updated"] for c in probe.calls)  # the update comes after the hook
    assert {c["optimizer"] for c in probe.calls} == {"MeZO"}

    # the user's logs reach Lightning once per step, as the mean over theta +- eps z
    user = [(n, v) for n, v in logged if not n.startswith("mezo/")]
    assert [n for n, _ in user] == ["train_loss", "train_loss_x2", "batch_idx"] * 3
    assert [v for n, v in user if n == "batch_idx"] == [0, 1, 2]
    mezo_loss = [v for n, v in logged if n == "mezo/loss"]
    assert len(mezo_loss) == 3
    for got, want in zip([v for n, v in user if n == "train_loss"], mezo_loss):
        assert got == pytest.approx(want, rel=1e-6)  # (L+ + L-) / 2
    assert float(trainer.callback_metrics["train_loss_x2"]) == pytest.approx(2 * mezo_loss[-1], rel=1e-6)


def test_mixin_trains_with_mezo(tmp_path):
    import tiny_lightning as tl

    from vleff.callbacks.mixins import MeZOMixin

    steps: list[bool] = []

    class Mixed(MeZOMixin, tl.TinyClassifier):
        def __init__(self, depth):
            super().__init__(depth=depth)
            self.use_mezo(eps=1e-3, lr=1e-2, seed=5)

        def training_step(self, batch, batch_idx):
            steps.append(torch.is_grad_enabled())
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    module = Mixed(depth=1)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = tl.trainer(tmp_path, max_steps=2)
    trainer.fit(module, tl.loader(n=16, batch_size=4))

    opt = trainer.optimizers[0]
    assert type(opt) is MeZO
    assert opt.steps_done == 2 and opt.base_seed == 5 and opt.param_groups[0]["lr"] == 1e-2
    assert trainer.global_step == 2
    assert steps == [False] * 4  # two forward-only evaluations per step
    assert any(not torch.equal(p, q) for p, q in zip(module.parameters(), before))
    assert all(p.grad is None for p in module.parameters())
    assert "training_step" not in vars(module)  # the module's own step is back after fit
    assert "train_loss" in trainer.callback_metrics and "mezo/projected_grad" in trainer.callback_metrics


# ---------------------------------------------------------------- DDP (2 CPU processes, gloo)


class _LinearModule:
    """Built inside the workers: a two-layer MLP classifier (keeps the spawned processes light)."""

    @staticmethod
    def make():
        import lightning.pytorch as pl

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-2)

        return Module()


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from vleff.callbacks import GaLore
    from vleff.callbacks import MeZO as MeZOCallback

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(24, 8, generator=g), torch.randint(0, 3, (24,), generator=g))
    for name, callback in (("galore", GaLore(rank=2, update_proj_gap=2)), ("mezo", MeZOCallback(lr=1e-2))):
        pl.seed_everything(0)
        module = _LinearModule.make()
        init = [p.detach().clone() for p in module.parameters()]
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=DDPStrategy(process_group_backend="gloo"),
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[callback],
        )
        trainer.fit(module, DataLoader(data, batch_size=4))
        changed = any(not torch.equal(p, q) for p, q in zip(module.parameters(), init))
        torch.save(
            {
                "params": [p.detach().clone() for p in module.parameters()],
                "changed": changed,
                "optimizer": type(trainer.optimizers[0]).__name__,
            },
            os.path.join(out_dir, f"{name}_{rank}.pt"),
        )
    torch.distributed.destroy_process_group()  # before exit: gloo left to exit can abort the process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for name, optimizer in (("galore", "GaLoreAdamW"), ("mezo", "MeZO")):
        r0 = torch.load(tmp_path / f"{name}_0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{name}_1.pt", weights_only=True)
        assert r0["optimizer"] == r1["optimizer"] == optimizer
        assert r0["changed"] and r1["changed"]
        for p, q in zip(r0["params"], r1["params"]):
            torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


# --- 16-bit weights: refused by default, because rounding (not the loss) then moves them ---------
def _regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g)
    return x, x @ (torch.randn(64, 8, generator=g) * 0.1)


def _mezo_delta(dtype: torch.dtype, lr: float, *, autocast: bool = False, steps: int = 30) -> torch.Tensor:
    """Weight change of a linear regression after ``steps`` MeZO steps, weights in ``dtype``
    (``autocast``: fp32 weights, forward under bf16 autocast)."""
    x, y = _regression()
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 8).to(dtype)
    w0 = lin.weight.detach().float().clone()
    opt = MeZO(lin.parameters(), lr=lr, eps=1e-3, allow_low_precision=dtype != torch.float32)

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return torch.nn.functional.mse_loss(lin(x.to(dtype)).float(), y)

    for _ in range(steps):
        opt.step(loss)
    return (lin.weight.detach().float() - w0).flatten()


def test_bf16_weights_drift_instead_of_training_and_bf16_autocast_does_not():
    """The reason for the refusal below: at MeZO's learning rates bf16 weights move by rounding
    (far more than the fp32 update, in an unrelated direction); fp32 weights with a bf16
    forward follow the fp32 run."""
    cos = torch.nn.functional.cosine_similarity
    for lr in (1e-4, 1e-6):
        ref = _mezo_delta(torch.float32, lr)
        low = _mezo_delta(torch.bfloat16, lr)
        mixed = _mezo_delta(torch.float32, lr, autocast=True)
        assert low.norm() > 2 * ref.norm() and abs(cos(low, ref, dim=0)) < 0.5, lr
        assert cos(mixed, ref, dim=0) > 0.95 and mixed.norm() == pytest.approx(ref.norm().item(), rel=0.1), lr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_trainable_weights_are_refused_unless_allowed(dtype):
    lin = torch.nn.Linear(4, 2).to(dtype)
    with pytest.raises(
        ValueError,
        match=rf"2 trainable parameter\(s\) are {dtype}.*allow_low_precision=False"
        r".*precision='bf16-mixed'",
    ):
        MeZO(lin.parameters(), lr=1e-6)
    with pytest.raises(ValueError, match="allow_low_precision"):  # a group added later too
        MeZO(torch.nn.Linear(4, 2).parameters()).add_param_group({"params": list(lin.parameters())})
    assert MeZO(lin.parameters(), allow_low_precision=True).allow_low_precision
    frozen = torch.nn.Sequential(torch.nn.Linear(4, 4).to(dtype).requires_grad_(False), torch.nn.Linear(4, 2))
    MeZO(frozen.parameters())  # frozen 16-bit weights are never perturbed: nothing to refuse
    with pytest.raises(ValueError, match="allow_low_precision='yes' is not allowed; use True or False"):
        MeZO(lin.parameters(), allow_low_precision="yes")


def test_callback_refuses_bf16_true_and_trains_under_bf16_mixed(tmp_path):
    import tiny_lightning as tl

    from vleff.callbacks import MeZO as MeZOCallback

    def fit(precision: str, **settings):
        torch.manual_seed(0)
        module = tl.TinyClassifier(depth=1)
        before = torch.cat([p.detach().float().flatten().clone() for p in module.parameters()])
        trainer = tl.trainer(
            tmp_path, callbacks=[MeZOCallback(eps=1e-3, lr=1e-3, **settings)], max_steps=3, precision=precision
        )
        trainer.fit(module, tl.loader(n=12, batch_size=4))
        return module, torch.cat([p.detach().float().flatten() for p in module.parameters()]) - before

    with pytest.raises(ValueError, match=r"torch.bfloat16.*precision='bf16-mixed'"):
        fit("bf16-true")
    module, _ = fit("bf16-true", allow_low_precision=True)  # accepted when asked for
    assert next(module.parameters()).dtype == torch.bfloat16
    _, ref = fit("32-true")
    module, mixed = fit("bf16-mixed")
    assert next(module.parameters()).dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(mixed, ref, dim=0) > 0.99
    with pytest.raises(ValueError, match="allow_low_precision=1 is not allowed"):
        MeZOCallback(allow_low_precision=1)
