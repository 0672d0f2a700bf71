"""Child-Tuning_D: the Fisher mask against an independent computation (per-batch backward,
``clip_grad_norm_`` per parameter, squared, averaged; numpy's percentile), the kept fraction
(hypothesis), the masked AdamW step against ChildTuningAdamW's step in float64, weight decay on
masked entries, only block parameters masked, exact start, the Lightning pass over the training
data, the mask surviving a checkpoint, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from child_tuning_reference import child_tuning_adamw_step
from hypothesis import example, given, settings
from hypothesis import strategies as st

import vleff
from vleff.methods.child_tuning_d import (
    apply_child_tuning_d,
    child_tuning_d_masks,
    masked_names,
    remove_child_tuning_d,
    select_child_tuning_d,
)
from vleff.side import selection as sel


def _data(n: int = 4, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, tm.IMG, tm.IMG, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _loss(model: torch.nn.Module):
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


def _reference_mask(model: torch.nn.Module, batches, max_grad_norm: float, reserve_p: float):
    """The reference's ``calculate_fisher``, worked out independently: for each batch a backward,
    ``clip_grad_norm_`` on each encoder-layer parameter alone, ``grad² / N`` summed; one
    ``np.percentile`` over all of them; ``score >= threshold``. Returns the masks and whether
    clipping changed any gradient."""
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.")]  # the reference's "layer" filter
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    clipped = False
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n in names:
            before = params[n].grad.norm().item()
            torch.nn.utils.clip_grad_norm_(params[n], max_grad_norm)
            clipped |= params[n].grad.norm().item() < before
            fisher[n] += params[n].grad.square() / len(batches)
    flat = np.concatenate([fisher[n].detach().flatten().numpy() for n in names])
    threshold = np.percentile(flat, (1 - reserve_p) * 100)
    return {n: torch.from_numpy(fisher[n].detach().numpy() >= threshold) for n in names}, clipped


@pytest.mark.parametrize("max_grad_norm", [1e-3, 100.0])
def test_the_mask_equals_the_reference_fisher_with_clipping_and_one_joint_percentile(max_grad_norm):
    torch.manual_seed(0)
    model = tm.timm_vit().double()
    batches = [_data(3, seed=s, dtype=torch.float64) for s in range(3)]
    reference = copy.deepcopy(model)
    apply_child_tuning_d(model, reserve_p=0.3, max_grad_norm=max_grad_norm, batches=batches, loss_fn=_loss(model))
    masks = child_tuning_d_masks(model)
    expected, clipped = _reference_mask(reference, batches, max_grad_norm, 0.3)
    assert clipped == (max_grad_norm < 1)  # the small norm exercises the clipping, the large one does not
    assert set(masks) == set(expected) == set(masked_names(model))
    for n in expected:
        assert torch.equal(masks[n], expected[n]), n
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == total - math.ceil(0.7 * (total - 1))  # distinct scores: the percentile's count
    # one joint threshold, not per tensor: the kept fraction differs between tensors
    fractions = {n: m.float().mean().item() for n, m in masks.items() if m.numel() > 100}
    assert max(fractions.values()) - min(fractions.values()) > 0.1


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    keep=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
@example(sizes=[1, 15], keep=1 / 3, seed=4, ties=False)  # position 10.000000000000002
def test_percentile_masks_equal_numpy_and_keep_the_analytic_count(sizes, keep, seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores = {f"p{i}": torch.rand(n, generator=g, dtype=torch.float64) for i, n in enumerate(sizes)}
    if ties:  # many equal (zero) scores, as unused parameters give
        scores = {k: torch.where(v < 0.5, torch.zeros_like(v), v) for k, v in scores.items()}
    masks = sel.percentile_masks(scores, keep)
    flat = np.concatenate([v.numpy() for v in scores.values()])
    threshold = np.percentile(flat, (1 - keep) * 100)
    for k, v in scores.items():
        assert np.array_equal(masks[k].numpy(), v.numpy() >= threshold)
    n = flat.size
    kept = sum(int(m.sum()) for m in masks.values())
    if not ties:
        # n - ceil((1 - keep)(n - 1)) entries; where that position is an integer up to float
        # rounding (sizes [1, 15], keep 1/3: 10.000000000000002), the interpolated threshold may sit
        # one ulp above that order statistic or on it, as numpy's does: one entry either way
        position = (1 - keep) * (n - 1)
        nearest = round(position)
        if abs(position - nearest) < 1e-9:
            assert kept in (n - nearest, n - nearest - 1)
        else:
            assert kept == n - math.ceil(position)
    assert kept >= 1


def test_masked_adamw_steps_equal_child_tuning_adamw_and_decay_reaches_masked_entries():
    """AdamW behind the masked step against the reference step with the same fixed mask (float64);
    a masked-off entry never gets a moment, so only the decoupled decay moves it:
    ``θ · (1 − lr·wd)^steps`` exactly; embeddings and head update in full."""
    torch.manual_seed(0)
    model = tm.timm_vit().double()
    reference = copy.deepcopy(model)
    lr, wd, betas, eps = 1e-2, 0.1, (0.9, 0.999), 1e-8
    apply_child_tuning_d(model, batches=[_data(4, dtype=torch.float64)], loss_fn=_loss(model))
    masks = child_tuning_d_masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    handles = sel.attach_masked_step(optimizer, model)
    names = [n for n, _ in model.named_parameters()]
    ref_params = [p.detach().clone() for p in reference.parameters()]
    state: list[dict] = [{} for _ in names]
    gate = [masks[n].double() if n in masks else None for n in names]
    for step in range(3):
        batch = _data(4, seed=10 + step, dtype=torch.float64)
        optimizer.zero_grad()
        _loss(model)(batch).backward()
        optimizer.step()
        with torch.no_grad():
            for p, new in zip(reference.parameters(), ref_params):
                p.copy_(new)
        reference.zero_grad()
        _loss(reference)(batch).backward()
        grads = [p.grad.detach().clone() for p in reference.parameters()]
        ref_params = child_tuning_adamw_step(
            ref_params, grads, state, gate, lr=lr, betas=betas, eps=eps, weight_decay=wd, variant="torch"
        )
        for (name, p), r in zip(model.named_parameters(), ref_params):
            torch.testing.assert_close(p, r, atol=1e-12, rtol=1e-10, msg=f"step {step}: {name}")
    for n, p in model.named_parameters():
        if n in masks:
            off = ~masks[n]
            torch.testing.assert_close(p[off], before[n][off] * (1 - lr * wd) ** 3, atol=1e-15, rtol=1e-12)
    assert not any(n.startswith("blocks.") for n in set(names) - set(masks))  # only the blocks are masked
    assert "cls_token" not in masks and "head.weight" not in masks and "patch_embed.proj.weight" not in masks
    sel.detach_masked_step(handles)


def test_open_clip_masks_its_resblocks_only():
    model = tm.open_clip_model()
    apply_child_tuning_d(model, towers="all")
    names = masked_names(model, "all")
    blocks = [n for n, _ in model.named_parameters() if ".resblocks." in n]
    assert sorted(names) == sorted(blocks) and names


def test_exact_start_nothing_frozen_and_remove_restores():
    torch.manual_seed(0)
    model = tm.timm_vit()
    untouched = copy.deepcopy(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    apply_child_tuning_d(model, batches=[_data(2)], loss_fn=_loss(model))
    x, _ = _data(2, seed=3)
    assert torch.equal(model(x), untouched(x))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # not parameter-efficient
    assert all(p.grad is None for p in model.parameters())  # the Fisher pass leaves .grad alone
    remove_child_tuning_d(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys and sel.record_of(model) is None


def test_bad_input_is_refused_clearly():
    for bad in (0, 1.5, -1, float("nan")):
        with pytest.raises(ValueError, match="reserve_p"):
            apply_child_tuning_d(tm.timm_vit(), reserve_p=bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        vleff.callbacks.ChildTuningD(max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="fisher_batches"):
        vleff.callbacks.ChildTuningD(fisher_batches=0)
    model = tm.timm_vit()
    with pytest.raises(ValueError, match="batches and loss_fn"):
        apply_child_tuning_d(model, batches=[_data(2)])
    apply_child_tuning_d(model)  # pending
    with pytest.raises(ValueError, match="no batch"):
        select_child_tuning_d(model, [], _loss(model))
    optimizer = torch.optim.AdamW(model.parameters())
    sel.attach_masked_step(optimizer, model)
    _loss(model)(_data(2)).backward()
    with pytest.raises(RuntimeError, match="Child-Tuning_D has no mask yet"):
        optimizer.step()
    with pytest.raises(ValueError, match="Child-Tuning_D is not applied"):
        select_child_tuning_d(tm.timm_vit(), [_data(2)], _loss(model))


class _Counting(tl.TinyClassifier):
    def __init__(self) -> None:
        super().__init__(depth=2)
        self.steps = 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return super().training_step(batch, batch_idx)


def test_callback_passes_once_over_the_training_data_and_the_mask_survives_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = _Counting()
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = tl.trainer(tmp_path, [vleff.callbacks.ChildTuningD()], max_steps=2, max_epochs=-1)
    trainer.fit(module, tl.loader(16, batch_size=4, seed=1))
    assert module.steps == 4 + 2  # the Fisher pass: every one of the 4 training batches, then 2 steps
    masks = child_tuning_d_masks(module)
    for n, p in module.model.named_parameters():
        key = f"model.{n}"
        if key in masks:  # no decay here: masked-off entries (no moments) stay bit-equal
            assert torch.equal(p[~masks[key]], before[n][~masks[key]]), n
        else:
            assert not torch.equal(p, before[n]), n  # embeddings and head update in full
    path = tmp_path / "ctd.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert set(saved["state_dict"]) == set(module.state_dict())  # the whole model: nothing is frozen
    resumed_module = _Counting()
    resumed = tl.trainer(tmp_path, [vleff.callbacks.ChildTuningD()], max_steps=3, max_epochs=-1)
    resumed.fit(resumed_module, tl.loader(16, batch_size=4, seed=1), ckpt_path=str(path))
    assert resumed_module.steps == 1  # no second Fisher pass: the checkpoint's mask
    assert all(torch.equal(child_tuning_d_masks(resumed_module)[n], m) for n, m in masks.items())


def test_mixin_selects_at_fit_start(tmp_path):
    class Module(vleff.callbacks.mixins.ChildTuningDMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__(depth=2)
            self.use_child_tuning_d(reserve_p=0.2, fisher_batches=1)

    module = Module()
    tl.trainer(tmp_path, max_steps=1, max_epochs=-1).fit(module, tl.loader(8, seed=1))
    masks = child_tuning_d_masks(module)
    assert masks is not None and set(masks) == {f"model.{n}" for n in masked_names(module.model)}


def test_bf16_weights_train_with_both_variants():
    """A bf16 model: the Fisher and percentile in bf16 scores, F's ``g / p`` rounded once (equal to
    the float computation rounded to bf16), finite AdamW steps."""
    torch.manual_seed(0)
    x, y = _data(4)
    for variant in ("f", "d"):
        model = tm.timm_vit().to(torch.bfloat16)
        loss = _loss(model)
        batch = (x.to(torch.bfloat16), y)
        if variant == "f":
            vleff.apply_child_tuning_f(model, reserve_p=0.3)
        else:
            apply_child_tuning_d(model, reserve_p=0.3, batches=[batch], loss_fn=loss)
            masks = child_tuning_d_masks(model)
            kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
            assert 0.29 < kept < 0.5  # bf16 scores tie more often: ties at the threshold are kept
        loss(batch).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        used = sel.mask_gradients(model)
        for n, p in model.named_parameters():
            if n in used:
                scale = 1 / 0.3 if variant == "f" else 1.0
                expected = (raw[n].float() * used[n].float() * scale).to(torch.bfloat16)
                assert torch.equal(p.grad, expected), (variant, n)
        before = [p.detach().clone() for p in model.parameters()]
        torch.optim.AdamW(model.parameters(), lr=1e-2).step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
