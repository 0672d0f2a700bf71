"""Memory savers: frozen parameters under MeZO, the module restored after a MeZO fit,
manual optimization and GaLore+MeZO refused at setup, constructor validation, and GaLore's
randomized low-rank SVD option."""

from __future__ import annotations

import math

import pytest
import tiny_lightning as tl
import torch

from vleff.callbacks import GaLore
from vleff.callbacks import MeZO as MeZOCallback
from vleff.memory import GaLoreAdamW, MeZO, galore_projection, mezo_from_optimizer


def _frozen_backbone_module(lr: float = 1e-2) -> tl.TinyClassifier:
    """The usual fine-tuning set-up: backbone frozen, ``AdamW(self.parameters())`` anyway."""
    torch.manual_seed(0)
    module = tl.TinyClassifier(depth=1, lr=lr)
    for name, p in module.model.named_parameters():
        if not name.startswith("head"):
            p.requires_grad_(False)
    return module


# ---------------------------------------------------------------- 1. frozen parameters


def test_mezo_step_leaves_frozen_params_alone_and_updates_the_rest_by_hand_formula():
    torch.manual_seed(0)
    frozen = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64), requires_grad=False)
    w = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    lr, eps, seed = 0.05, 1e-3, 3

    def loss_at(f_, w_):
        return ((x @ (f_ + w_)).tanh() ** 2).mean()

    f0, w0 = frozen.detach().clone(), w.detach().clone()
    opt = MeZO([frozen, w], lr=lr, eps=eps, seed=seed)
    opt.step(lambda: loss_at(frozen, w))
    # the direction is drawn for the trainable parameter only (the frozen one is skipped)
    zw = torch.randn(w0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g = (loss_at(f0, w0 + eps * zw) - loss_at(f0, w0 - eps * zw)) / (2 * eps)
    assert torch.equal(frozen.detach(), f0)
    torch.testing.assert_close(w.detach(), w0 - lr * g * zw, atol=1e-12, rtol=0)


def test_mezo_callback_with_frozen_backbone_in_adamw_groups(tmp_path):
    module = _frozen_backbone_module()
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback(eps=1e-3)], max_steps=3)
    trainer.fit(module, tl.loader(n=16, batch_size=4))
    opt = trainer.optimizers[0]
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert in_opt == trainable  # exactly AdamW's effective set: the head
    for n, p in module.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_mezo_from_optimizer_drops_frozen_params():
    module = _frozen_backbone_module()
    opt = mezo_from_optimizer(torch.optim.AdamW(module.parameters(), lr=1e-3), module)
    kept = [p for g in opt.param_groups for p in g["params"]]
    assert kept == [p for p in module.parameters() if p.requires_grad]


# ---------------------------------------------------------------- 2. module restored after a MeZO fit


def test_backprop_fit_after_mezo_fit_trains_like_a_fresh_module(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier(depth=1)
    mezo_trainer = tl.trainer(tmp_path / "mezo", callbacks=[MeZOCallback(eps=1e-3, lr=1e-3)], max_steps=2)
    mezo_trainer.fit(module, tl.loader(n=16, batch_size=4))
    assert module.automatic_optimization is True
    assert mezo_trainer.global_step == 2  # the MeZO steps still count after the switch back

    twin = tl.TinyClassifier(depth=1)
    twin.load_state_dict(module.state_dict())
    results = []
    for m, sub in ((module, "a"), (twin, "b")):
        torch.manual_seed(1)
        trainer = tl.trainer(tmp_path / sub, max_steps=3)
        trainer.fit(m, tl.loader(n=16, batch_size=4))
        results.append(trainer.global_step)
    assert results == [3, 3]
    for (n, p), q in zip(module.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=n)


def test_mezo_mixin_restores_automatic_optimization_at_fit_end(tmp_path):
    from vleff.callbacks.mixins import MeZOMixin

    class Mixed(MeZOMixin, tl.TinyClassifier):
        def __init__(self, depth):
            super().__init__(depth=depth)
            self.use_mezo(eps=1e-3, lr=1e-3)

    torch.manual_seed(0)
    module = Mixed(depth=1)
    trainer = tl.trainer(tmp_path, max_steps=2)
    trainer.fit(module, tl.loader(n=16, batch_size=4))
    assert module.automatic_optimization is True
    assert trainer.global_step == 2 and trainer.optimizers[0].steps_done == 2


# ---------------------------------------------------------------- 3. manual optimization refused


def test_mezo_refuses_manual_optimization_at_setup(tmp_path):
    calls = []

    class Manual(tl.TinyClassifier):
        def __init__(self):
            super().__init__(depth=1)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            calls.append(batch_idx)
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

        def configure_optimizers(self):
            calls.append("configure_optimizers")
            return super().configure_optimizers()

    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback()], max_steps=1)
    with pytest.raises(
        ValueError,
        match=r"MeZO needs a module with automatic optimization.*"
        r"automatic_optimization=False",
    ):
        trainer.fit(Manual(), tl.loader(n=4, batch_size=4))
    assert calls == []  # refused at setup: before the optimizer is built or a step runs


# ---------------------------------------------------------------- 4. GaLore + MeZO refused


def test_galore_and_mezo_callbacks_together_are_refused(tmp_path):
    for order in ([GaLore(rank=4), MeZOCallback()], [MeZOCallback(), GaLore(rank=4)]):
        trainer = tl.trainer(tmp_path, callbacks=order, max_steps=1)
        with pytest.raises(
            ValueError,
            match=r"the (GaLore|MeZO) callback cannot be used with the (MeZO|GaLore) callback: "
            r"both replace the optimizer",
        ):
            trainer.fit(tl.TinyClassifier(depth=1), tl.loader(n=4, batch_size=4))


def test_mezo_callback_refuses_galore_mixin_module(tmp_path):
    from vleff.callbacks.mixins import GaLoreMixin

    class Own(GaLoreMixin, tl.TinyClassifier):
        def configure_optimizers(self):
            return self.galore_optimizer(rank=4)

    trainer = tl.trainer(tmp_path, callbacks=[MeZOCallback()], max_steps=1)
    with pytest.raises(
        ValueError, match="the MeZO callback cannot be used with Own, a GaLoreMixin module: both replace the optimizer"
    ):
        trainer.fit(Own(depth=1), tl.loader(n=4, batch_size=4))


# ---------------------------------------------------------------- 6. constructor validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, r"seed=-1 .*int in \[0"),
        ({"seed": 1.5}, r"seed=1.5 "),
        ({"seed": True}, r"seed=True "),
        ({"params": "(unclosed"}, r"params pattern '\(unclosed' is not a valid regular expression"),
        ({"params": 3}, r"params=3 is not allowed"),
        ({"lr": math.inf}, r"lr=inf .*finite"),
        ({"lr": math.nan}, r"lr=nan .*finite"),
        ({"eps": math.inf}, r"eps=inf .*finite number > 0"),
        ({"eps": 0.0}, r"eps=0.0 "),
        ({"eps": "1e-3"}, r"eps='1e-3' "),
        ({"weight_decay": -1.0}, r"weight_decay=-1.0 "),
    ],
)
def test_mezo_callback_validates_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeZOCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": "(bad"}, r"targets pattern '\(bad' is not a valid regular expression"),
        ({"targets": 5}, r"targets=5 is not allowed"),
        ({"exclude": ["ok", 1]}, r"exclude=\['ok', 1\] is not allowed"),
        ({"scale": 0}, r"scale=0 .*finite number > 0"),
        ({"scale": math.inf}, r"scale=inf "),
        ({"scale": math.nan}, r"scale=nan "),
        ({"rank": 2.0}, r"rank=2.0 .*positive int"),
        ({"update_proj_gap": -5}, r"update_proj_gap=-5 .*positive int"),
        ({"svd": "qr"}, r"svd='qr' is not allowed; use one of full, lowrank"),
    ],
)
def test_galore_callback_validates_in_init(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaLore(**kwargs)


# ---------------------------------------------------------------- 12. low-rank SVD option


def _decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values 1/(i+1): a spectrum that decays like real gradients'."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64) ** 2
    return ((u * s) @ v.T).float(), v[:, :8].T.float(), u[:, :8].float()


@pytest.mark.parametrize("shape", [(96, 64), (64, 160)])
def test_lowrank_projection_spans_the_top_singular_subspace(shape):
    grad, v_top, u_top = _decaying(*shape)
    proj, right = galore_projection(grad, 8, svd="lowrank")
    exact = v_top if right else u_top.T  # the subspace the matrix was built with, as rows
    p = proj if right else proj.T
    assert p.shape == exact.shape
    torch.testing.assert_close(p @ p.T, torch.eye(8), atol=1e-5, rtol=0)  # orthonormal
    gap = torch.linalg.matrix_norm(p.T @ p - exact.T @ exact)  # ||P Pᵀ - P* P*ᵀ||_F
    assert gap < 1e-3


def test_lowrank_projection_keeps_the_global_rng_and_is_deterministic():
    grad = torch.randn(80, 48)
    state = torch.random.get_rng_state()
    a, _ = galore_projection(grad, 8, svd="lowrank")
    assert torch.equal(torch.random.get_rng_state(), state)
    b, _ = galore_projection(grad, 8, svd="lowrank")
    assert torch.equal(a, b)


def test_galore_adamw_svd_option_reaches_the_refresh(monkeypatch):
    import vleff.memory.galore as galore_mod

    seen = []
    real = galore_mod.galore_projection

    def spy(grad, rank, proj_type="std", svd="full"):
        seen.append(svd)
        return real(grad, rank, proj_type, svd)

    monkeypatch.setattr(galore_mod, "galore_projection", spy)
    w = torch.nn.Parameter(torch.randn(40, 24))
    opt = GaLoreAdamW([w], rank=4, svd="lowrank")
    w.grad = torch.randn(40, 24)
    opt.step()
    assert seen == ["lowrank"]
    with pytest.raises(ValueError, match="svd='randomized' is not allowed"):
        GaLoreAdamW([w], rank=4, svd="randomized")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"example_input_fn": "images"}, r"example_input_fn='images' is not allowed; it must be a callable"),
        ({"batch_size_fn": 4}, r"batch_size_fn=4 is not allowed; it must be a callable"),
        ({"window": 0}, r"window=0 is not allowed; it must be an int >= 1"),
        ({"window": 2.5}, r"window=2.5 is not allowed"),
        ({"recount_interval": True}, r"recount_interval=True is not allowed"),
        ({"training_flops_factor": math.nan}, r"training_flops_factor=nan is not allowed"),
    ],
)
def test_efficiency_monitor_validates_in_init(kwargs, message):
    from vleff.callbacks import EfficiencyMonitor

    with pytest.raises(ValueError, match=message):
        EfficiencyMonitor(**kwargs)
