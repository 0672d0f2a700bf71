"""Child-Tuning_F: the masked AdamW step against ChildTuningAdamW's step worked out in float64
(seeded masks), the kept fraction, exact start and removal, the Lightning masking point (after
the backward, before the moments), resume (the draw counter), bad values."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from child_tuning_reference import bernoulli_draw, child_tuning_adamw_step

import vleff
from vleff.methods.child_tuning_f import (
    apply_child_tuning_f,
    child_tuning_f_step,
    masked_names,
    remove_child_tuning_f,
)
from vleff.side import selection as sel


def _data(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, tm.IMG, tm.IMG, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _loss(model: torch.nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("seed", [0, 7])
def test_masked_adamw_steps_equal_child_tuning_adamw_in_float64(seed):
    """Three steps of ``torch.optim.AdamW`` behind the masked step against the reference step
    with the same seeded Bernoulli masks (torch's AdamW arithmetic), to float64 noise."""
    torch.manual_seed(0)
    model = tm.timm_vit().double()
    reference = copy.deepcopy(model)
    p_keep, lr, wd, betas, eps = 0.3, 1e-2, 0.1, (0.9, 0.999), 1e-8
    apply_child_tuning_f(model, reserve_p=p_keep, seed=seed)
    names = masked_names(model)
    assert names == [n for n, _ in model.named_parameters()]  # every tower parameter, the head too
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    handles = sel.attach_masked_step(optimizer, model)
    ref_params = [p.detach().clone() for p in reference.parameters()]
    ref_state: list[dict] = [{} for _ in ref_params]
    for step in range(3):
        batch = _data(4, seed=step, dtype=torch.float64)
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
        # the reference's gradients at its own parameters, by autograd on the untouched model
        with torch.no_grad():
            for p, new in zip(reference.parameters(), ref_params):
                p.copy_(new)
        reference.zero_grad()
        _loss(reference, batch).backward()
        grads = [p.grad.detach().clone() for p in reference.parameters()]
        draws = bernoulli_draw([p.shape for p in ref_params], p_keep, seed, step)
        gate = [d.double() / p_keep for d in draws]
        ref_params = child_tuning_adamw_step(
            ref_params, grads, ref_state, gate, lr=lr, betas=betas, eps=eps, weight_decay=wd, variant="torch"
        )
        for (name, p), r in zip(model.named_parameters(), ref_params):
            torch.testing.assert_close(p, r, atol=1e-12, rtol=1e-10, msg=f"step {step}: {name}")
    assert child_tuning_f_step(model) == 3
    sel.detach_masked_step(handles)


@pytest.mark.parametrize("p_keep", [0.1, 0.3, 1.0])
def test_the_draw_keeps_the_requested_fraction_and_scales_by_one_over_p(p_keep):
    model = tm.timm_vit()
    apply_child_tuning_f(model, reserve_p=p_keep)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    masks = sel.mask_gradients(model, advance=True)
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    # binomial: within 5 standard deviations of p·n
    assert abs(kept - p_keep * total) <= 5 * (total * p_keep * (1 - p_keep)) ** 0.5 + 1e-9
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, masks[name].float() / p_keep), name
    # the next step draws another mask, the same step the same one
    assert child_tuning_f_step(model) == 1
    again = sel.mask_gradients(model)
    if p_keep < 1:
        assert any(not torch.equal(masks[n], again[n]) for n in masks)
    sel.record_of(model)["step"] = 0
    assert all(torch.equal(masks[n], m) for n, m in sel.mask_gradients(model).items())


def test_exact_start_nothing_frozen_and_remove_restores():
    torch.manual_seed(0)
    model = tm.timm_vit()
    model.blocks[1].mlp.fc1.weight.requires_grad_(False)  # a user's own choice survives
    untouched = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_child_tuning_f(model)
    x, _ = _data(2)
    assert torch.equal(model(x), untouched(x))  # the forward is the model's own
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # not parameter-efficient
    remove_child_tuning_f(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys and sel.record_of(model) is None


@pytest.mark.parametrize("bad", [0, -0.1, 1.2, float("nan"), "0.3", True])
def test_bad_reserve_p_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="reserve_p"):
        apply_child_tuning_f(tm.timm_vit(), reserve_p=bad)
    with pytest.raises(ValueError, match="reserve_p"):
        vleff.callbacks.ChildTuningF(reserve_p=bad)


class _RawGrads(pl.Callback):
    """Records the unmasked gradients (this callback runs before Child-Tuning's in the list)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_masks_this_steps_whole_gradient_before_the_optimizer(tmp_path, accumulate):
    """With SGD (lr 1, no momentum) each step moves a parameter by minus its masked gradient: the
    mask of step t from the documented draw times this step's (accumulated) gradient / p. An
    optimizer step pre-hook would have masked the previous or a partly accumulated gradient
    (Lightning runs the backward inside ``optimizer.step(closure)``)."""
    torch.manual_seed(0)
    module = tl.TinyClassifier(depth=2)
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=1.0)
    raw = _RawGrads()
    snapshots = []

    class _Params(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    callbacks = [_Params(), raw, vleff.callbacks.ChildTuningF(reserve_p=0.5, seed=3)]
    trainer = tl.trainer(tmp_path, callbacks, max_steps=2, max_epochs=-1, accumulate_grad_batches=accumulate)
    trainer.fit(module, tl.loader(16, seed=1))
    snapshots.append({n: p.detach().clone() for n, p in module.named_parameters()})
    names = [f"model.{n}" for n in masked_names(module.model)]
    assert len(raw.grads) == 2
    for step in range(2):
        draws = dict(zip(names, bernoulli_draw([raw.grads[step][n].shape for n in names], 0.5, 3, step)))
        before, after = snapshots[step * accumulate], snapshots[(step + 1) * accumulate]
        for n in names:
            expected = before[n] - raw.grads[step][n] * draws[n] / 0.5
            torch.testing.assert_close(after[n], expected, atol=1e-7, rtol=1e-6, msg=f"step {step}: {n}")
    assert child_tuning_f_step(module) == 2


def test_resume_continues_the_draws_where_the_checkpoint_left_them(tmp_path):
    """Exact resume for a random mask: the draw of step t is a function of (seed, t), t is in the
    checkpoint; the global RNG does not matter (the conformance suite compares the weights)."""
    module = tl.TinyClassifier(depth=2)
    trainer = tl.trainer(tmp_path, [vleff.callbacks.ChildTuningF(seed=5)], max_steps=3, max_epochs=-1)
    trainer.fit(module, tl.loader(16, seed=1))
    path = tmp_path / "ct.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["vleff_selection"]
    assert saved["step"] == 3 and saved["seed"] == 5 and saved["masks"] is None
    fresh = tl.TinyClassifier(depth=2)
    resumed = tl.trainer(tmp_path, [vleff.callbacks.ChildTuningF(seed=5)], max_steps=4, max_epochs=-1)
    resumed.fit(fresh, tl.loader(16, seed=1), ckpt_path=str(path))
    assert child_tuning_f_step(fresh) == 4


def test_mixin_masks_in_its_own_hook(tmp_path):
    class Module(vleff.callbacks.mixins.ChildTuningFMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__(depth=2)
            self.use_child_tuning_f(reserve_p=0.5)

    module = Module()
    tl.trainer(tmp_path, max_steps=2, max_epochs=-1).fit(module, tl.loader(8, seed=1))
    assert child_tuning_f_step(module) == 2  # one draw per optimizer step, not per hook
