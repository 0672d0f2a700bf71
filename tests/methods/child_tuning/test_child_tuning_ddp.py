"""Child-Tuning under 2-process DDP (gloo, ``ddp_fork``): every rank masks the same entries (F: the
same Bernoulli draw each step, from the (seed, step) generator; D: rank 0's Fisher mask broadcast),
so the replicas stay equal. A per-rank draw would mask the all-reduced gradient differently on each
rank and the replicas would diverge after the first step."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch

import vleff


class _SameOnEveryRank(pl.Callback):
    """Runs after Child-Tuning's callback: the masked (all-reduced) gradients of each step and the
    trained weights at the end, gathered and compared across the ranks; the result per rank in a file."""

    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir
        self.grads_equal: list[bool] = []
        self.zero_fraction: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        flat = torch.cat([p.grad.flatten() for p in pl_module.model.blocks.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        self.grads_equal.append(bool(torch.equal(gathered[0], gathered[1])))
        self.zero_fraction.append(float((flat == 0).float().mean()))

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        masked = all(f > 0.5 for f in self.zero_fraction)  # the masks are active (p = 0.3 keeps ~30 %)
        (self.out_dir / f"rank{trainer.global_rank}.txt").write_text(
            f"{all(self.grads_equal)} {len(self.grads_equal)} {bool(torch.equal(gathered[0], gathered[1]))} {masked}"
        )


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
@pytest.mark.parametrize(
    "callback",
    [("ChildTuningF", {"reserve_p": 0.3}), ("ChildTuningD", {"reserve_p": 0.3, "fisher_batches": 1})],
    ids=["F", "D"],
)
def test_every_rank_masks_the_same_entries_and_the_replicas_stay_equal(callback, tmp_path):
    name, settings = callback
    module = tl.TinyClassifier(depth=2)
    method = getattr(vleff.callbacks, name)(**settings)
    trainer = tl.trainer(
        tmp_path, [method, _SameOnEveryRank(tmp_path)], max_steps=3, max_epochs=-1, devices=2, strategy="ddp_fork"
    )
    trainer.fit(module, tl.loader(16))
    assert trainer.state.finished
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "True 3 True True"
