"""EViT: selection by cls attention, fusion, sizes, schedule, every family, Lightning integration."""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
from families import image_forwards
from hypothesis import given, settings
from hypothesis import strategies as st
from vleff.tokens.evit import (
    EViTConfig,
    EViTHook,
    EViTSchedule,
    apply_evit,
    evit_keep_rate,
    keep_rate_schedule,
    remove_evit,
    update_evit,
)

from vleff.backbones import BlockInfo, TokenState, last_token_state
from vleff.callbacks import EViT
from vleff.callbacks.mixins import EViTMixin


def _manual(x, attn, p, k, fuse):
    """Independent reference: loop over the batch with Python sorting."""
    out = []
    for b in range(x.shape[0]):
        scores = attn[b, p:].tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        keep, rest = sorted(order[:k]), order[k:]
        rows = [x[b, i] for i in range(p)] + [x[b, p + i] for i in keep]
        if fuse:
            w = torch.tensor([scores[i] for i in rest])
            w = w / w.sum()
            rows.append(sum(wi * x[b, p + i] for wi, i in zip(w, rest)))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("prefix", [1, 2])
def test_between_keeps_top_cls_attention_in_order(fuse, prefix):
    g = torch.Generator().manual_seed(0)
    b, n, c = 3, prefix + 10, 6
    x = torch.randn(b, n, c, generator=g)
    attn = torch.rand(b, n, generator=g).softmax(dim=1)
    state = TokenState(num_prefix=prefix, num_input_tokens=n, num_tokens=n, batch_size=b)
    hook = EViTHook(EViTConfig(locations=[0], keep_rate=0.55, fuse=fuse), depth=1)
    out = hook.between(x, BlockInfo(index=0, depth=1, _k=x[:, None], _rows={0: attn}), state)
    k = math.ceil(0.55 * 10)
    torch.testing.assert_close(out, _manual(x, attn, prefix, k, fuse))
    if fuse:
        assert state.size.shape == (b, prefix + k + 1, 1)
        assert bool((state.size[:, :-1] == 1).all()) and bool((state.size[:, -1] == 10 - k).all())
    else:
        assert state.size is None


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 40), kr=st.floats(0.05, 1.0), stages=st.integers(1, 3), seed=st.integers(0, 100))
def test_sizes_and_sources_are_conserved(n, kr, stages, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n + 1, 4, generator=g)
    state = TokenState(num_prefix=1, num_input_tokens=n + 1, num_tokens=n + 1, batch_size=2)
    state.register("source", torch.eye(n + 1).expand(2, n + 1, n + 1), "sum")
    hook = EViTHook(EViTConfig(locations=list(range(stages)), keep_rate=kr, fuse=True), depth=stages)
    for i in range(stages):
        attn = torch.rand(2, x.shape[1], generator=g)
        x = hook.between(x, BlockInfo(index=i, depth=stages, _k=x[:, None], _rows={0: attn}), state)
    if state.size is None:  # nothing was pruned
        assert x.shape[1] == n + 1
        return
    assert bool((state.size.sum(dim=1) == n + 1).all())
    source = state.get("source")
    torch.testing.assert_close(source.sum(dim=1), torch.ones(2, n + 1))  # every patch in exactly one token
    torch.testing.assert_close(source.sum(dim=2, keepdim=True), state.size)


def test_token_counts_and_full_keep_rate_is_identity():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=4).eval()
    x = tm.images(2)
    with torch.no_grad():
        ref = model(x)
        apply_evit(model, keep_rate=0.5, locations=[1, 2], fuse=True)
        model(x)
        # block 1: 16 patches -> ceil(8) + fused; block 2: ceil(0.5 * 9) = 5 + fused
        assert last_token_state(model).token_counts == [17, 17, 1 + 8 + 1, 1 + 5 + 1]
        apply_evit(model, keep_rate=0.5, locations=[1, 2], fuse=False)
        model(x)
        assert last_token_state(model).token_counts == [17, 17, 9, 5]
        update_evit(model, keep_rate=1.0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert evit_keep_rate(model) == 1.0
    remove_evit(model)
    with pytest.raises(ValueError, match="not applied"):
        remove_evit(model)


FAMILIES = image_forwards("timm_vit", "deit_distilled", "open_clip", "hf_clip", "hf_blip")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_prunes_and_trains(family):
    make, run = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    apply_evit(model, keep_rate=0.5, locations=[0, 1])
    out = run(model.train(), tm.images(2))
    out.float().pow(2).mean().backward()
    state = last_token_state(model)
    p = state.num_prefix
    assert state.token_counts == [p + 16, p + 8 + 1] + [p + 5 + 1] * (len(state.token_counts) - 2)
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_bf16_autocast():
    torch.manual_seed(0)
    model = tm.timm_vit(depth=3)
    apply_evit(model, keep_rate=0.7, locations=[1, 2]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tm.images(4))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert last_token_state(model).size.dtype == torch.float32


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_autocast_on_every_family(family):
    make, run = FAMILIES[family]
    torch.manual_seed(0)
    model = make()
    apply_evit(model, keep_rate=0.7, locations=[0, 1]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, tm.images(2))
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert last_token_state(model).token_counts[-1] < last_token_state(model).token_counts[0]


def test_schedule():
    assert keep_rate_schedule(0.5, 0.7, start_epoch=1, end_epoch=3) == 1.0
    assert keep_rate_schedule(1.0, 0.7, start_epoch=1, end_epoch=3) == pytest.approx(1.0)
    assert keep_rate_schedule(2.0, 0.7, start_epoch=1, end_epoch=3) == pytest.approx(0.85)  # cos(pi/2) = 0
    assert keep_rate_schedule(2.5, 0.7, start_epoch=1, end_epoch=3) == pytest.approx(
        0.7 + 0.3 * (1 + math.cos(0.75 * math.pi)) / 2
    )
    assert keep_rate_schedule(9.0, 0.7, start_epoch=1, end_epoch=3) == pytest.approx(0.7)
    assert keep_rate_schedule(0.0, 0.7) == 0.7  # no end: straight to the target
    with pytest.raises(ValueError, match="end_epoch=1"):
        EViTSchedule(0.7, start_epoch=2, end_epoch=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(keep_rate=0.0), "keep_rate=0.0"),
        (dict(keep_rate=1.01), "keep_rate=1.01"),
        (dict(keep_rate="0.7"), "keep_rate='0.7'"),
        (dict(locations=[3]), r"locations=\[3\]"),
        (dict(locations=[2, 1]), "strictly increasing"),
        (dict(locations=[]), "at least one"),
        (dict(fuse=1), "fuse=1"),
    ],
)
def test_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_evit(tm.timm_vit(depth=3), **kwargs)
    with pytest.raises(ValueError, match="keep_rate=1.5"):
        EViT(keep_rate=1.5)


def test_model_without_cls_token_is_refused():
    model = tm.timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="needs a cls token"):
        apply_evit(model)
    model(tm.images(1))  # left unpatched
    assert last_token_state(model) is None


class RecordKeepRate(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(round(evit_keep_rate(pl_module), 6))


def test_callback_schedule_and_resume(tmp_path):
    expected = [round(keep_rate_schedule(e + b / 4, 0.5, 0, 3), 6) for e in range(3) for b in range(4)]
    full = RecordKeepRate()
    tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2], end_epoch=3), full], max_epochs=3).fit(
        tl.TinyClassifier(), tl.loader(16)
    )
    assert full.seen == expected

    first = RecordKeepRate()
    trainer = tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2], end_epoch=3), first], max_epochs=1)
    trainer.fit(tl.TinyClassifier(), tl.loader(16))
    ckpt = tmp_path / "evit.ckpt"
    trainer.save_checkpoint(ckpt)
    second = RecordKeepRate()

    class CheckRestored(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rate = evit_keep_rate(pl_module)

    check = CheckRestored()
    tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2], end_epoch=3), second, check], max_epochs=3).fit(
        tl.TinyClassifier(), tl.loader(16), ckpt_path=ckpt
    )
    assert check.rate == pytest.approx(first.seen[-1])  # restored before the first resumed batch
    assert first.seen + second.seen == expected


def test_schedule_ends_at_max_steps_when_training_is_limited_by_steps(tmp_path):
    # tl.loader(16) has 4 batches per epoch: max_steps=6 ends at epoch 1.5
    seen = RecordKeepRate()
    tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2]), seen], max_steps=6, max_epochs=-1).fit(
        tl.TinyClassifier(), tl.loader(16)
    )
    expected = [round(keep_rate_schedule(step / 4, 0.5, 0, 1.5), 6) for step in range(6)]
    assert seen.seen == expected and seen.seen[1] > 0.9  # a cosine, not a jump to the target
    with pytest.raises(ValueError, match="neither is set"):
        tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2])], max_epochs=-1).fit(
            tl.TinyClassifier(), tl.loader(16)
        )


def test_callback_leaves_fit_at_the_target_and_evaluates_there(tmp_path):
    module = tl.TinyClassifier()
    callback = EViT(keep_rate=0.5, locations=[1, 2], end_epoch=3)
    seen = RecordKeepRate()
    trainer = tl.trainer(tmp_path, [callback, seen], max_steps=2, max_epochs=-1)
    trainer.fit(module, tl.loader(16))  # stopped long before the schedule's end
    assert seen.seen[-1] > 0.9 and callback.current == pytest.approx(seen.seen[-1])
    assert evit_keep_rate(module) == 0.5
    ckpt = tmp_path / "early.ckpt"
    trainer.save_checkpoint(ckpt)

    class Rate(pl.Callback):
        def on_validation_start(self, trainer, pl_module):
            self.rate = evit_keep_rate(pl_module)

    rate = Rate()
    tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1, 2], end_epoch=3), rate]).validate(
        tl.TinyClassifier(), tl.loader(8), ckpt_path=ckpt
    )
    assert rate.rate == 0.5
    with torch.no_grad():
        module.eval()(tm.images(2))
    assert last_token_state(module).token_counts == [17, 17, 1 + 8 + 1]


def test_callback_init_from_loads_weights(tmp_path):
    torch.manual_seed(0)
    trained = tl.TinyClassifier()
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"state_dict": trained.state_dict()}, ckpt)

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.same = all(torch.equal(v, trained.state_dict()[k]) for k, v in pl_module.state_dict().items())

    check = Check()
    torch.manual_seed(1)
    tl.trainer(tmp_path, [EViT(keep_rate=0.5, locations=[1], init_from=str(ckpt)), check], max_steps=1).fit(
        tl.TinyClassifier(), tl.loader(8)
    )
    assert check.same


class MixinClassifier(EViTMixin, tl.TinyClassifier):
    def __init__(self):
        super().__init__()
        self.use_evit(keep_rate=0.5, locations=[1, 2], start_epoch=0, end_epoch=2)


def test_mixin_schedule_and_checkpoint(tmp_path):
    module = MixinClassifier()
    trainer = tl.trainer(tmp_path, max_epochs=1)
    trainer.fit(module, tl.loader(16))
    assert module._vleff_evit_keep_rate == pytest.approx(keep_rate_schedule(0.75, 0.5, 0, 2))
    assert evit_keep_rate(module) == 0.5  # fit ends at the target
    ckpt = tmp_path / "mixin.ckpt"
    trainer.save_checkpoint(ckpt)
    restored = MixinClassifier.load_from_checkpoint(ckpt)
    assert restored._vleff_evit_keep_rate == pytest.approx(module._vleff_evit_keep_rate)
    assert evit_keep_rate(restored) == 0.5  # loaded for use: the target

    class Check(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.rate = evit_keep_rate(pl_module)

    check = Check()  # resuming fit continues the schedule from where it stopped
    tl.trainer(tmp_path, [check], max_epochs=2).fit(MixinClassifier(), tl.loader(16), ckpt_path=ckpt)
    assert check.rate == pytest.approx(keep_rate_schedule(0.75, 0.5, 0, 2))


class RankReport(pl.Callback):
    def __init__(self, out_dir):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # the last one wins
        counts = last_token_state(pl_module).token_counts
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(f"{evit_keep_rate(pl_module):.6f} {counts}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_ddp_two_processes_cpu(tmp_path):
    trainer = tl.trainer(
        tmp_path,
        [EViT(keep_rate=0.5, locations=[1, 2]), RankReport(tmp_path)],
        max_steps=2,
        devices=2,
        strategy="ddp_fork",
    )
    trainer.fit(tl.TinyClassifier(), tl.loader(16))
    assert trainer.state.finished
    # 16 samples over 2 ranks at batch 4: 2 batches per epoch, last step at epoch 0.5 of max_epochs=1
    rate = keep_rate_schedule(0.5, 0.5, 0, 1)
    counts = [17, 17, 1 + math.ceil(rate * 16) + 1]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == f"{rate:.6f} {counts}"


def test_tome_then_evit_then_remove_tome_equals_evit_alone():
    """The stacking bug of the old framework: ToMe's proportional attention lived on the shared
    tower patch, so after removing ToMe, EViT kept adding ``log size`` (its fused token's size)
    to the attention, unlike EViT alone."""
    import copy

    from vleff.tokens.tome import apply_tome, remove_tome

    model = tm.timm_vit(depth=4).eval()
    alone = copy.deepcopy(model)
    x = tm.images(2)
    with torch.no_grad():
        for r, locations in (([2, 0, 0, 0], [2, 3]), (2, [1, 2])):  # apart, then in the same blocks
            apply_tome(model, r=r)
            apply_evit(model, keep_rate=0.5, locations=locations)
            model(x)
            remove_tome(model)
            apply_evit(alone, keep_rate=0.5, locations=locations)
            torch.testing.assert_close(model(x), alone(x), atol=0, rtol=0)
