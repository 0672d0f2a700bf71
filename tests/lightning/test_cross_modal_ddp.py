"""CrossGET and MADTP callbacks under Lightning DDP: two CPU processes, gloo.

What must hold on every rank after training: the trained parameters (the whole CLIP, with
CrossGET's cross-token offsets or MADTP's codebook and projections) are equal across ranks and
moved; and for MADTP, every rank prunes with the *same* τ, first pruning block and controller
history, although each rank's sampler gives it other calibration batches (calibrated on rank
0, broadcast to the others).
"""

from __future__ import annotations

import json
import os
import warnings

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import torch

import vleff


class _RankReport(pl.Callback):
    """Writes, per rank, whether the flat parameters equal rank 0's and moved, and MADTP's state."""

    def __init__(self, out_dir) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        self.start = torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()])
        self.trained_with = []

    def on_train_epoch_start(self, trainer, pl_module):  # the τ each epoch trains with
        module = getattr(pl_module.model, "vleff_madtp", None)
        if module is not None:
            self.trained_with.append([module.tau, module.start])

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        report = {
            "same": bool(torch.equal(gathered[0], gathered[1])),
            "moved": not torch.equal(flat, self.start),
            "names": sorted(n for n, _ in pl_module.named_parameters() if "vleff" in n)[:3],
        }
        madtp = next((c for c in trainer.callbacks if isinstance(c, vleff.callbacks.MADTP)), None)
        controller = madtp.controller if madtp is not None else getattr(pl_module, "_vleff_madtp", None)
        if controller is not None:
            module = pl_module.model.vleff_madtp
            report.update(
                tau=module.tau,
                start=module.start,
                history=controller.history,
                trained_with=self.trained_with,
                first_ids=controller.batches[0][1][0].tolist(),
            )
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class _MixinCLIP(vleff.callbacks.MADTPMixin, tl.TinyCLIP):
    """TinyCLIP trained with MADTP through the mixin (its loss + ``self.vleff_aux_loss()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.use_madtp(**_MADTP_SETTINGS)

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.vleff_aux_loss()


_MADTP_SETTINGS = {
    "flops_reduction": 0.3,
    "calibration_batches": 1,
    "max_evals": 8,
    "epoch_max_evals": 4,
    "measure": "image",
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_madtp_mixin_under_two_process_ddp_gloo(tmp_path):
    torch.manual_seed(0)
    module = _MixinCLIP()
    trainer = tl.trainer(tmp_path, [_RankReport(tmp_path)], max_epochs=2, devices=2, strategy="ddp_fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.fit(module, tl.pair_loader(16, batch_size=4))
    r0, r1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert r0["same"] and r0["moved"] and r1["same"]
    assert r0["first_ids"] == r1["first_ids"] and (r0["tau"], r0["start"]) == (r1["tau"], r1["start"])
    assert r0["history"] == r1["history"] and len(r0["history"]) == 3
    assert r0["trained_with"] == r1["trained_with"] and len(r0["trained_with"]) == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
@pytest.mark.parametrize(
    "method", [{"CrossGET": {"r_image": 2, "r_text": 1}}, {"MADTP": _MADTP_SETTINGS}], ids=["crossget", "madtp"]
)
def test_cross_modal_callbacks_under_two_process_ddp_gloo(method, tmp_path):
    torch.manual_seed(0)
    module = tl.TinyCLIP()
    ((name, settings),) = method.items()
    callback = getattr(vleff.callbacks, name)(**settings)
    trainer = tl.trainer(tmp_path, [callback, _RankReport(tmp_path)], max_epochs=2, devices=2, strategy="ddp_fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 2-block tower cannot always reach the target
        trainer.fit(module, tl.pair_loader(16, batch_size=4))
    assert trainer.state.finished
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["same"] and report["moved"] and report["names"], report
    if name == "MADTP":
        r0, r1 = reports
        assert r0["first_ids"] == r1["first_ids"]  # rank 0's calibration batches everywhere
        assert (r0["tau"], r0["start"]) == (r1["tau"], r1["start"])
        assert r0["history"] == r1["history"] and len(r0["history"]) == 3, (
            r0["history"],
            r1["history"],
        )  # before, after 2 epochs
        assert r0["trained_with"] == r1["trained_with"] and len(r0["trained_with"]) == 2  # every epoch, same τ
