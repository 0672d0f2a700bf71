"""Replayable blocks (issue 30, point 1): under gradient checkpointing a patched block is
recomputed in backward from a copy of the token state it started from, so the recomputation
equals the forward and leaves the forward's state alone; hooks that cannot replay are refused at
apply (and at the forward, when checkpointing is turned on later)."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

import vleff
from vleff.backbones import TowerHook, get_patch, last_token_state
from vleff.tokens.common import install_hooks


@pytest.fixture(params=[False, True], ids=["nonreentrant", "reentrant"])
def reentrant(request):
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(request.param)
    yield request.param
    set_reentrant_ckpt(before)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_forwards_then_one_backward_replay_each_its_own_state(reentrant):
    """Gradient accumulation (or two losses) runs several forwards before one backward: each
    block is replayed from the state of the forward it belongs to."""
    torch.manual_seed(0)
    model = vleff.apply_tome(tm.timm_vit(depth=3).double().train(), r=3)
    a, b = tm.images(2, seed=1).double(), tm.images(3, seed=2).double()  # other sizes: other merges
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (plain, model):
        (m(a).square().sum() + m(b).abs().sum()).backward()
    expected, got = _grads(plain), _grads(model)
    assert expected.keys() == got.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-12, msg=n)


def test_replays_leave_the_forwards_token_state_alone():
    model = vleff.apply_evit(tm.timm_vit(depth=3).train(), keep_rate=0.5, locations=[1])
    model.set_grad_checkpointing(True)
    out = model(tm.images())
    state = last_token_state(model)
    counts, fields = list(state.token_counts), {k: f.value for k, f in state.fields.items()}
    out.sum().backward()
    after = last_token_state(model)
    assert after is state and after.token_counts == counts
    assert all(after.fields[k].value is v for k, v in fields.items())


class CountingHook(TowerHook):
    """A user's hook that keeps state on itself (a counter of the blocks it ran): a recomputed
    block would count twice, so it does not declare ``replayable``."""

    name = "user_counter"

    def __init__(self) -> None:
        self.blocks = 0

    def between(self, x, info, state):
        self.blocks += 1
        return x


def test_a_hook_that_cannot_replay_is_refused_at_apply_and_leaves_the_model_as_it_was():
    """Every method's hooks replay (CrossGET and MADTP too: their losses pair in the last block
    with what the forward recorded); a hook that does not say so is refused up front."""
    model = tm.open_clip_model().train()
    model.set_grad_checkpointing(True)
    keys = set(model.state_dict())
    with pytest.raises(
        ValueError, match="cannot apply user_counter: .*gradient checkpointing on.*set_grad_checkpointing"
    ):
        install_hooks(model, lambda tower: CountingHook(), "all")
    assert set(model.state_dict()) == keys and get_patch(model.visual) is None


def test_checkpointing_turned_on_after_apply_is_refused_at_the_forward():
    model = tm.open_clip_model().train()
    install_hooks(model, lambda tower: CountingHook(), "image")
    model.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="gradient checkpointing on.*user_counter"):
        model.encode_image(tm.images())


def test_reentrant_checkpointing_is_refused_in_the_forward_when_gradients_leave_the_blocks(reentrant):
    """DynamicViT's keep mask reaches later blocks through the token state: re-entrant
    checkpointing (a forward without gradients) would cut the predictors' gradient, so the
    forward itself refuses it (it used to slip past and fail in backward with a shape error);
    non-re-entrant checkpointing gives the unchecked gradients."""
    torch.manual_seed(0)
    model = vleff.apply_dynamicvit(tm.timm_vit(depth=3).train(), locations=[1])
    plain = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    if reentrant:
        with pytest.raises(RuntimeError, match="re-entrant checkpointing.*dynamicvit"):
            model(tm.images())  # the forward itself, before any backward
        return
    for m in (plain, model):
        torch.manual_seed(1)  # the same Gumbel noise
        m(tm.images()).square().mean().backward()
    expected, got = _grads(plain), _grads(model)
    assert any("dynamicvit" in n for n in got) and expected.keys() == got.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)


def test_vqt_refuses_reentrant_checkpointing_which_would_cut_its_gradients(reentrant):
    model = vleff.apply_vqt(tm.timm_vit(depth=2).train(), num_queries=2)
    model.set_grad_checkpointing(True)
    if reentrant:
        with pytest.raises(RuntimeError, match="re-entrant checkpointing.*vqt.*set_reentrant_ckpt\\(False\\)"):
            model(tm.images())
        return
    plain = copy.deepcopy(model)
    plain.set_grad_checkpointing(False)
    for m in (plain, model):
        m(tm.images()).square().mean().backward()
    expected, got = _grads(plain), _grads(model)
    assert any("vqt" in n for n in got) and expected.keys() == got.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], msg=n)


def test_a_tome_warmup_from_r0_trains_under_checkpointing_like_without(tmp_path):
    """A warm-up from r = 0 under checkpointing (how large ViTs are trained) used to stop at the
    first step; now it trains, and the weights equal those of the same run without checkpointing."""
    import tiny_lightning as tl

    from vleff.callbacks import TokenMerging

    trained = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = tl.TinyClassifier()
        module.model.set_grad_checkpointing(checkpointing)
        trainer = tl.trainer(
            tmp_path / str(checkpointing), [TokenMerging(r=3, schedule="linear", warmup_steps=2)], max_steps=4
        )
        trainer.fit(module, tl.loader())
        assert last_token_state(module).token_counts == [17, 14, 11]  # the full r after the warm-up
        trained.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=1e-6)
