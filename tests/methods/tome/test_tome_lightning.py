"""ToMe in a real Trainer.fit: callback, schedule through checkpoints, mixin, DDP."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch
from vleff.tokens.schedule import RSchedule
from vleff.tokens.tome import tome_r

import vleff
from vleff.callbacks import TokenMerging
from vleff.callbacks.mixins import TokenMergingMixin


class RecordR(pl.Callback):
    """Records the r in force at every training batch (runs after TokenMerging)."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, tome_r(pl_module)[0]))


def test_callback_merges_during_fit_and_stays_applied(tmp_path):
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [TokenMerging(r=3)], max_steps=3)
    trainer.fit(module, tl.loader(), tl.loader(8))
    assert vleff.last_token_state(module).token_counts == [17, 14, 11]
    assert trainer.callback_metrics["tome/r_mean"] == 3
    vleff.remove_tome(module)
    module(torch.randn(1, 3, 32, 32))
    assert vleff.last_token_state(module) is None


def test_schedule_values():
    sched = RSchedule(r=4, schedule="linear", warmup_steps=4)
    assert [sched.r_at(s, 2)[0] for s in range(6)] == [0, 1, 2, 3, 4, 4]
    assert RSchedule.from_state_dict(RSchedule(r=(4, 0.5)).state_dict()).r == (4, 0.5)
    with pytest.raises(ValueError, match="schedule='cosine'"):
        RSchedule(schedule="cosine")
    with pytest.raises(ValueError, match="warmup_steps > 0"):
        RSchedule(schedule="linear")
    with pytest.raises(ValueError, match="r=-2"):
        TokenMerging(r=-2)


def test_checkpoint_resume_continues_schedule(tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    first = RecordR()
    trainer = tl.trainer(tmp_path, [TokenMerging(r=4, schedule="linear", warmup_steps=8), first], max_steps=4)
    trainer.fit(tl.TinyClassifier(), tl.loader(32))
    trainer.save_checkpoint(ckpt)
    assert [r for _, r in first.seen] == [0, 0, 1, 2]  # round(4 * step / 8)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert any("TokenMerging" in key for key in saved)

    second = RecordR()
    resumed = tl.trainer(
        tmp_path, [TokenMerging(r=4, schedule="linear", warmup_steps=8), second], max_steps=9, max_epochs=-1
    )
    resumed.fit(tl.TinyClassifier(), tl.loader(32), ckpt_path=ckpt)
    assert second.seen[0] == (4, 2)  # continues at step 4, not from 0
    assert [r for _, r in second.seen] == [2, 2, 3, 4, 4]


class MixinClassifier(TokenMergingMixin, tl.TinyClassifier):
    def __init__(self):
        super().__init__()
        self.use_tome(r=4, schedule="linear", warmup_steps=4)


def test_mixin_schedule_and_checkpoint(tmp_path):
    module = MixinClassifier()
    trainer = tl.trainer(tmp_path, max_steps=2)
    trainer.fit(module, tl.loader(16))
    assert tome_r(module) == [4, 4, 4]  # training ran the warm-up; the trained model runs at the full r
    ckpt = tmp_path / "mixin.ckpt"
    trainer.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["vleff_tome_schedule"]["warmup_steps"] == 4
    loaded = MixinClassifier.load_from_checkpoint(ckpt)  # a bug once loaded this at r = 0
    assert tome_r(loaded) == [4, 4, 4]

    class MixinRecorded(MixinClassifier):
        def on_train_batch_start(self, batch, batch_idx):
            super().on_train_batch_start(batch, batch_idx)
            seen.append((self.trainer.global_step, tome_r(self)[0]))

    seen: list[tuple[int, int]] = []
    resumed = tl.trainer(tmp_path, max_steps=5, max_epochs=-1)
    resumed.fit(MixinRecorded(), tl.loader(16), ckpt_path=ckpt)
    assert seen == [(2, 2), (3, 3), (4, 4)]  # continues the warm-up from step 2


def test_r_from_a_hydra_config_resumes_from_a_weights_only_checkpoint(tmp_path):
    from omegaconf import OmegaConf

    r = OmegaConf.create({"r": [4, 2, 1]}).r  # what Hydra hands the callback: a ListConfig
    ckpt = tmp_path / "cfg.ckpt"
    trainer = tl.trainer(tmp_path, [TokenMerging(r=r, schedule="linear", warmup_steps=2)], max_steps=2)
    trainer.fit(tl.TinyClassifier(), tl.loader(16))
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]  # plain types only
    (state,) = [v for k, v in states.items() if "TokenMerging" in k]
    assert state["schedule"]["r"] == [4, 2, 1] and type(state["schedule"]["r"]) is list
    record = RecordR()
    resumed = tl.trainer(
        tmp_path, [TokenMerging(r=r, schedule="linear", warmup_steps=2), record], max_steps=3, max_epochs=-1
    )
    resumed.fit(tl.TinyClassifier(), tl.loader(16), ckpt_path=ckpt)
    assert record.seen == [(2, 4)]


class RecordTokens(pl.Callback):
    """Writes, per rank, the tokens entering each block in that rank's last training forward."""

    def __init__(self, out):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import json

        import torch.distributed as dist

        record = {
            "rank": trainer.global_rank,
            "world": dist.get_world_size(),
            "tokens": vleff.token_counts(pl_module),
            "r": tome_r(pl_module),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_ddp_two_processes_cpu(tmp_path):
    import json

    module = tl.TinyClassifier()
    trainer = tl.trainer(
        tmp_path, [TokenMerging(r=3), RecordTokens(tmp_path)], max_steps=2, devices=2, strategy="ddp_fork"
    )
    trainer.fit(module, tl.loader(16))
    assert trainer.state.finished
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"]) for r in records] == [(0, 2), (1, 2)]
    for r in records:  # both ranks merged: 17 tokens, 3 fewer per block
        assert r["r"] == [3, 3, 3]
        assert r["tokens"] == {"image": [17, 14, 11]}


def test_validate_test_predict_after_fit_run_at_the_full_r(tmp_path):
    """Issue 13: ``setup`` re-applied ToMe at r = 0 for validate/test/predict and the update was
    skipped because the schedule's r "had not changed": evaluation ran unmerged."""
    from vleff.backbones import last_token_state

    class CountTokens(pl.Callback):
        def __init__(self):
            self.counts = []

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            self.counts.append(last_token_state(pl_module).token_counts)

    module = tl.TinyClassifier()
    counter = CountTokens()
    trainer = tl.trainer(tmp_path, [TokenMerging(r=4), counter], max_steps=2, limit_val_batches=1)
    trainer.fit(module, tl.loader(8), tl.loader(4))
    trainer.validate(module, tl.loader(4), verbose=False)
    fresh = tl.trainer(tmp_path, [TokenMerging(r=4), counter])
    fresh.validate(module, tl.loader(4), verbose=False)
    fresh.validate(module, tl.loader(4), verbose=False)  # a second validate on the same trainer
    expected = [17, 13, 9]  # 16 patches + cls, 4 merged per block
    assert counter.counts and all(c == expected for c in counter.counts), counter.counts
