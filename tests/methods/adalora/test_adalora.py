"""AdaLoRA through peft: initial counts, exact start, exact remove, the orthogonal regulariser
added through vleff's aux loss, and a real Trainer.fit in which the ranks fall to the budget."""

from __future__ import annotations

import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from peft_checks import check_remove_restores_exactly, max_start_change

import vleff
from vleff.methods.adalora import (
    adalora_parameters,
    allocator,
    apply_adalora,
    orthogonal_regulariser,
    rank_pattern,
    ranks,
    remove_adalora,
)
from vleff.tokens.aux import pop_aux_losses

C = 64
CASES = [("timm_vit", "image"), ("hf_clip", "image"), ("hf_clip", "text")]


def adalora_count(init_r: int, shapes: list[tuple[int, int]]) -> int:
    """``P: r × in``, ``Λ: r``, ``Q: out × r`` per ``(out, in)`` target at the start."""
    return sum(init_r * (i + o + 1) for o, i in shapes)


@pytest.mark.parametrize("family, tower", CASES)
def test_adalora_starts_exactly_and_counts_its_initial_parameters(family, tower):
    assert max_start_change(family, tower, lambda m: apply_adalora(m, init_r=6, target_r=2, total_step=10)) == 0.0
    model = tm.timm_vit() if family == "timm_vit" else tm.hf_clip_model()
    apply_adalora(model, init_r=6, target_r=2, total_step=10)
    shapes = [(3 * C, C)] * 3 if family == "timm_vit" else [(C, C)] * 3 * 4
    assert sum(p.numel() for p in adalora_parameters(model)) == adalora_count(6, shapes)
    # before the first allocation every target has its init_r (Λ starts at zero: not a rank of 0)
    assert rank_pattern(model) is None and set(ranks(model).values()) == {6} and len(ranks(model)) == len(shapes)


def test_adalora_remove_restores_names_flags_and_state_exactly():
    def perturb(model):
        for p in adalora_parameters(model):
            p.normal_()

    check_remove_restores_exactly(
        "timm_vit", lambda m: apply_adalora(m, init_r=2, target_r=1, total_step=4), remove_adalora, perturb
    )


def test_the_orthogonal_regulariser_is_the_papers_and_is_a_pending_aux_loss_after_a_training_forward():
    torch.manual_seed(0)
    model = tm.timm_vit()
    apply_adalora(model, init_r=3, target_r=1, total_step=4, orth_reg_weight=0.25)
    terms = []
    for block in model.blocks:
        p, q = block.attn.qkv.lora_A["default"], block.attn.qkv.lora_B["default"]
        terms += [(p @ p.T - torch.eye(3)).square().sum().sqrt(), (q.T @ q - torch.eye(3)).square().sum().sqrt()]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(orthogonal_regulariser(model), expected)
    model.eval()
    model(tm.images())
    assert pop_aux_losses(model) == {}  # nothing in eval
    model.train()
    model(tm.images())
    losses = pop_aux_losses(model)
    torch.testing.assert_close(losses["adalora_orth"], 0.25 * expected)
    assert losses["adalora_orth"].requires_grad and pop_aux_losses(model) == {}  # popped: counted once


def _fit(tmp_path, steps: int, total_step: int, **settings):
    import lightning.pytorch as pl

    class Budget(pl.Callback):
        """The ranks after every optimizer step (after AdaLoRA's allocation, which runs first)."""

        def __init__(self):
            self.ranks, self.budgets = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ranks.append(sum(ranks(pl_module).values()))
            self.budgets.append(allocator(pl_module).budget_schedule(trainer.global_step)[0])

    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    budget = Budget()
    callback = vleff.callbacks.AdaLoRA(init_r=4, target_r=2, total_step=total_step, **settings)
    trainer = tl.trainer(tmp_path, [callback, budget], max_steps=steps, max_epochs=-1)
    trainer.fit(module, tl.loader(8, seed=1))
    return module, budget, trainer


def test_adalora_callback_ranks_fall_to_the_budget_in_a_real_fit(tmp_path):
    """3 targets, init_r 4 -> target_r 2 over 6 steps: the masked ranks follow peft's cubic budget at
    every step and end at the 6-rank budget, in the pattern peft's allocator recorded."""
    module, budget, trainer = _fit(tmp_path, 6, 6)
    assert 12 > budget.ranks[0] > budget.ranks[-1] == 6  # falls from the first step (tinit=0)
    assert budget.ranks == budget.budgets  # every step masked exactly to the schedule's budget
    final = ranks(module)
    assert sum(final.values()) == 2 * 3  # target_r x targets
    pattern = rank_pattern(module)
    assert {k.rsplit(".lora_E", 1)[0]: sum(v) for k, v in pattern.items()} == final
    assert len(set(final.values())) >= 1 and all(0 <= r <= 4 for r in final.values())
    assert "train/aux/adalora_orth" in trainer.callback_metrics  # the regulariser went into the loss


def test_adalora_total_step_defaults_to_max_steps_and_settings_are_checked():
    with pytest.raises(ValueError, match=r"target_r=5 is not allowed: it must be at most init_r=4"):
        vleff.callbacks.AdaLoRA(init_r=4, target_r=5)
    with pytest.raises(ValueError, match=r"total_step=None is not allowed.*total_step="):
        apply_adalora(tm.timm_vit())
    with pytest.raises(ValueError, match=r"tinit=3 is not allowed with total_step=3"):
        apply_adalora(tm.timm_vit(), total_step=3, tinit=3)
    with pytest.raises(ValueError, match="beta1"):
        apply_adalora(tm.timm_vit(), total_step=3, beta1=1.0)
    with pytest.raises(TypeError, match=r"AdaLoRA does not support open_clip .*in_proj_weight"):
        apply_adalora(tm.open_clip_model(), total_step=3)


def test_adalora_callback_without_total_step_takes_max_steps(tmp_path):
    import lightning.pytorch as pl

    torch.manual_seed(0)
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [vleff.callbacks.AdaLoRA(init_r=2, target_r=1)], max_steps=3, max_epochs=-1)
    trainer.fit(module, tl.loader(4))
    assert allocator(module).peft_config.total_step == 3 and sum(ranks(module).values()) == 3
    assert isinstance(trainer, pl.Trainer)


def _run(tmp_path, max_steps: int, ckpt=None, save=None):
    torch.manual_seed(0)
    module = tl.TinyClassifier(lr=1e-2)
    callback = vleff.callbacks.AdaLoRA(init_r=4, target_r=1, total_step=10)  # still allocating at step 8
    trainer = tl.trainer(tmp_path, [callback], max_steps=max_steps, max_epochs=-1)
    trainer.fit(module, tl.loader(4, seed=1), ckpt_path=ckpt)  # one batch per epoch
    if save:
        trainer.save_checkpoint(save)
    return module


def test_adalora_resume_keeps_the_allocators_scores_and_allocates_as_the_uninterrupted_run(tmp_path):
    """The importance scores are smoothed over every step (peft's exponential averages): a resumed run
    must continue them, or it prunes by other scores than the uninterrupted run (on the tiny model the
    pruned set happens to coincide, so the scores themselves are compared)."""
    straight = _run(tmp_path, 8)
    ckpt = str(tmp_path / "half.ckpt")
    _run(tmp_path, 4, save=ckpt)
    resumed = _run(tmp_path, 8, ckpt=ckpt)
    assert rank_pattern(resumed) == rank_pattern(straight)
    for name in ("exp_avg_ipt", "exp_avg_unc"):
        a, b = getattr(allocator(straight), name), getattr(allocator(resumed), name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=1e-5, msg=key)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)


def test_adalora_callback_without_total_step_or_max_steps_is_refused_naming_both(tmp_path):
    trainer = tl.trainer(tmp_path, [vleff.callbacks.AdaLoRA(init_r=2, target_r=1)], max_steps=-1, max_epochs=1)
    with pytest.raises(ValueError, match=r"total_step=None and the trainer has no max_steps"):
        trainer.fit(tl.TinyClassifier(), tl.loader(4))
