"""FishMask: the empirical Fisher against autograd run sample by sample (float64), the mask's count
against the analytic one, masked-off entries unchanged by real AdamW steps with weight decay,
refusals without batches, exact removal, the callback's selection at fit start and the mask in
checkpoints."""

from __future__ import annotations

import copy

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F

import vleff
from vleff.methods.fishmask import apply_fishmask, fishmask_masks, ranked_names, remove_fishmask, select_fishmask
from vleff.side import selection as sel


def _data(n: int = 6, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, tm.IMG, tm.IMG, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _loss(model: torch.nn.Module):
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


def test_fisher_is_the_sum_of_squared_per_sample_gradients_in_float64():
    """The reference's importance: each sample's gradient at its true label, squared, summed —
    worked out here with one ``backward`` per sample on an untouched copy."""
    torch.manual_seed(0)
    model = tm.timm_vit().double().eval()
    x, y = _data(5, dtype=torch.float64)
    reference = copy.deepcopy(model)
    expected = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for i in range(5):
        reference.zero_grad()
        F.cross_entropy(reference(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in reference.named_parameters():
            expected[n] += p.grad.square()
    params = dict(model.named_parameters())
    scores, units = sel.fisher_information(params, _loss(model), [(x[:3], y[:3]), (x[3:], y[3:])], per_sample=True)
    assert units == 5
    for n in params:
        torch.testing.assert_close(scores[n], expected[n], atol=1e-12, rtol=1e-10, msg=n)
    # per batch: each batch's mean-loss gradient squared
    per_batch, units = sel.fisher_information(params, _loss(model), [(x[:3], y[:3]), (x[3:], y[3:])], per_sample=False)
    assert units == 2
    reference.zero_grad()
    F.cross_entropy(reference(x[:3]), y[:3]).backward()
    first = {n: p.grad.square() for n, p in reference.named_parameters()}
    reference.zero_grad()
    F.cross_entropy(reference(x[3:]), y[3:]).backward()
    for n, p in reference.named_parameters():
        torch.testing.assert_close(per_batch[n], first[n] + p.grad.square(), atol=1e-12, rtol=1e-10, msg=n)


@pytest.mark.parametrize("keep_ratio", [0.005, 0.05, 0.5])
def test_the_mask_keeps_the_requested_fraction_of_the_ranked_entries_globally(keep_ratio):
    torch.manual_seed(0)
    model = tm.timm_vit()
    x, y = _data(4)
    untouched = copy.deepcopy(model)
    apply_fishmask(model, keep_ratio=keep_ratio, batches=[(x, y)], loss_fn=_loss(model))
    masks = fishmask_masks(model)
    head = {"head.weight", "head.bias"}
    ranked = {n: p for n, p in model.named_parameters() if n not in head}  # the analytic set: all but the head
    assert set(masks) == set(ranked) == set(ranked_names(model))
    total = sum(p.numel() for p in ranked.values())
    assert sum(int(m.sum()) for m in masks.values()) == int(keep_ratio * total)
    # global, not per tensor: the kept entries are the largest Fisher scores of all tensors together
    scores, _ = sel.fisher_information(
        {n: p for n, p in untouched.named_parameters() if n in ranked}, _loss(untouched), [(x, y)]
    )
    flat = torch.cat([scores[n].flatten() for n in ranked])
    kept = torch.cat([masks[n].flatten() for n in ranked])
    assert flat[kept].min() >= flat[~kept].max()
    assert model.head.weight.requires_grad  # the classifier trains in full


def test_masked_off_entries_do_not_move_under_adamw_with_weight_decay():
    torch.manual_seed(0)
    model = tm.timm_vit()
    x, y = _data(4)
    apply_fishmask(model, keep_ratio=0.05, batches=[(x, y)], loss_fn=_loss(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    handles = sel.attach_masked_step(optimizer, model)
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model)((x, y)).backward()
        optimizer.step()
    masks = fishmask_masks(model)
    moved = 0
    for n, p in model.named_parameters():
        if n in masks:
            assert torch.equal(p[~masks[n]], before[n][~masks[n]]), n  # bit-equal: not decayed, no momentum
            moved += int((p[masks[n]] != before[n][masks[n]]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())  # the selected entries train
    assert not torch.equal(model.head.weight, before["head.weight"])
    sel.detach_masked_step(handles)


def test_a_step_without_a_selected_mask_and_a_selection_without_batches_are_refused():
    model = tm.timm_vit()
    apply_fishmask(model, keep_ratio=0.1)  # pending
    optimizer = torch.optim.AdamW(model.parameters())
    sel.attach_masked_step(optimizer, model)
    _loss(model)(_data(2)).backward()
    with pytest.raises(RuntimeError, match="FishMask has no mask yet"):
        optimizer.step()
    with pytest.raises(ValueError, match="no batch"):
        select_fishmask(model, [], _loss(model))
    with pytest.raises(ValueError, match="batches and loss_fn"):
        apply_fishmask(tm.timm_vit(), batches=[_data(2)])


def test_remove_restores_flags_and_leaves_no_mask():
    model = tm.timm_vit()
    model.blocks[1].mlp.fc1.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_fishmask(model, keep_ratio=0.1, batches=[_data(2)], loss_fn=_loss(model))
    remove_fishmask(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert sel.record_of(model) is None and fishmask_masks(model) is None


def test_callback_selects_at_fit_start_trains_only_the_mask_and_checkpoints_it(tmp_path):
    torch.manual_seed(0)
    module = tl.TinyClassifier()
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = tl.trainer(
        tmp_path, [vleff.callbacks.FishMask(keep_ratio=0.05, fisher_batches=2)], max_steps=3, max_epochs=-1
    )
    trainer.fit(module, tl.loader(8, seed=1))
    masks = fishmask_masks(module)
    assert masks is not None
    for n, p in module.model.named_parameters():
        key = f"model.{n}"
        if key in masks:
            assert torch.equal(p[~masks[key]], before[n][~masks[key]]), n
    path = tmp_path / "fish.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert set(saved["vleff_selection"]["masks"]) == set(masks)
    assert all(torch.equal(saved["vleff_selection"]["masks"][n], m) for n, m in masks.items())


def test_mixin_selects_at_fit_start(tmp_path):
    class Module(vleff.callbacks.mixins.FishMaskMixin, tl.TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.use_fishmask(keep_ratio=0.05, fisher_batches=1)

    torch.manual_seed(0)
    module = Module()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    tl.trainer(tmp_path, max_steps=2, max_epochs=-1).fit(module, tl.loader(8, seed=1))
    masks = fishmask_masks(module)  # applied to the module holding the ViT
    assert masks is not None
    for n, p in module.model.named_parameters():
        if f"model.{n}" in masks:
            assert torch.equal(p[~masks[f"model.{n}"]], before[n][~masks[f"model.{n}"]]), n
