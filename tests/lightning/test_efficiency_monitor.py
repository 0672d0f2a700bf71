"""EfficiencyMonitor in real ``Trainer.fit`` runs (CPU): values checked against vleff.profile
computed independently, token recount on a schedule change, odd batches, 2-process DDP."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import tiny_lightning as tl
import tiny_models as tm
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger
from measure.test_profile import vit_flops
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vleff.callbacks import EfficiencyMonitor
from vleff.profile import count_flops, saved_activation_bytes

BATCH = 4


class TinyClassifier(pl.LightningModule):
    """``forward(images)``; batches are ``(images, labels)`` or ``{"image": ..., "label": ...}``."""

    def __init__(self, tome_r: int = 0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = tm.timm_vit()
        if tome_r:
            import vleff

            vleff.apply_tome(self.model, r=tome_r)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class DictDataset(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x, self.y = tm.images(n), torch.arange(n) % 10

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def loader(n: int = 16, as_dict: bool = False) -> DataLoader:
    data = DictDataset(n) if as_dict else TensorDataset(tm.images(n), torch.arange(n) % 10)
    return DataLoader(data, batch_size=BATCH)


def trainer(tmp_path: Path, callbacks, max_steps: int = 3, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def logged_rows(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("**/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def column(rows, key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key, "") != ""]


def test_fit_sets_flops_per_batch_and_logs(tmp_path):
    module = TinyClassifier()
    monitor = EfficiencyMonitor()
    throughput = ThroughputMonitor(batch_size_fn=lambda b: b[0].shape[0], window_size=2)
    trainer(tmp_path, [monitor, throughput]).fit(module, loader())

    x = tm.images(BATCH)
    forward = count_flops(module.model.eval(), x)
    assert forward == vit_flops(batch=BATCH)  # the analytic count (see test_profile)
    assert module.flops_per_batch == 3 * forward
    assert monitor.flops_per_sample == forward / BATCH
    module.model.train()
    assert monitor.activation_bytes == saved_activation_bytes(lambda: module(x))

    rows = logged_rows(tmp_path)
    assert column(rows, "eff/gflops_per_sample") == pytest.approx([forward / BATCH / 1e9] * 3)
    assert column(rows, "eff/activation_mib")[0] == pytest.approx(monitor.activation_bytes / 2**20)
    assert len(column(rows, "eff/samples_per_s")) == 3 and min(column(rows, "eff/samples_per_s")) > 0
    assert column(rows, "train/device/flops_per_sec"), "ThroughputMonitor did not see flops_per_batch"
    assert not any(k.startswith("eff/tokens_layer") for k in rows[0])  # no token method: no token columns
    assert module.training  # the monitor's eval-mode count restored the mode


def test_token_counts_logged_and_flops_recounted_on_change(tmp_path):
    from vleff.tokens.tome import update_tome

    class ChangeR(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                update_tome(pl_module.model, r=4)

    module = TinyClassifier(tome_r=2)
    monitor = EfficiencyMonitor(recount_interval=1)
    trainer(tmp_path, [ChangeR(), monitor], max_steps=5).fit(module, loader(20))

    rows = logged_rows(tmp_path)
    per_layer = [column(rows, f"eff/tokens_layer{i}") for i in range(3)]
    # 17 tokens (16 patches + cls) enter block 0; r tokens merged after each block
    assert [col[0] for col in per_layer] == [17, 15, 13]
    assert [col[-1] for col in per_layer] == [17, 13, 9]
    assert monitor.recounts == 2
    gflops = column(rows, "eff/gflops_per_sample")
    assert gflops[0] > gflops[-1]
    assert monitor.flops_per_sample == count_flops(module.model.eval(), tm.images(BATCH)) / BATCH


def test_dict_batches_and_custom_inputs(tmp_path):
    module = TinyClassifier()
    monitor = EfficiencyMonitor(measure_activation=False)
    trainer(tmp_path, [monitor], max_steps=2).fit(module, loader(as_dict=True))
    assert monitor.flops_per_sample == count_flops(module.model.eval(), tm.images(BATCH)) / BATCH

    module = TinyClassifier()
    monitor = EfficiencyMonitor(example_input_fn=lambda b: {"images": b[0][:1]}, batch_size_fn=lambda b: 1)
    trainer(tmp_path / "kw", [monitor], max_steps=1).fit(module, loader())
    assert monitor.flops_per_sample == count_flops(module.model.eval(), tm.images(1))


def test_failing_forward_warns_and_training_continues(tmp_path):
    module = TinyClassifier()
    monitor = EfficiencyMonitor(example_input_fn=lambda b: ("not", "a", "tensor"), batch_size_fn=lambda b: 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(tmp_path, [monitor], max_steps=2)
        fit.fit(module, loader())
    assert fit.global_step == 2
    assert any("example_input_fn" in str(w.message) for w in caught)
    assert monitor.flops_per_sample is None and not hasattr(module, "flops_per_batch")
    assert column(logged_rows(tmp_path), "eff/samples_per_s")


def test_bad_arguments():
    with pytest.raises(ValueError, match="window"):
        EfficiencyMonitor(window=0)
    with pytest.raises(ValueError, match="training_flops_factor"):
        EfficiencyMonitor(training_flops_factor=0)


class RecordRank(pl.Callback):
    """Each DDP process writes what it saw (the processes' state does not come back)."""

    def __init__(self, out: Path, monitor: EfficiencyMonitor) -> None:
        self.out, self.monitor = out, monitor

    def on_train_end(self, trainer, pl_module):
        import json

        import torch.distributed as dist

        record = {
            "rank": trainer.global_rank,
            "world": dist.get_world_size(),
            "backend": dist.get_backend(),
            "flops_per_batch": pl_module.flops_per_batch,
            "tokens": self.monitor.token_counts,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="ddp_fork needs os.fork")
def test_ddp_two_processes_cpu(tmp_path):
    # ddp_fork: two gloo processes forked from this one. ddp_spawn works the same but each
    # spawned interpreter re-imports torch + lightning (~15-40 s on a busy 2-core machine).
    import json

    module = TinyClassifier(tome_r=2)
    monitor = EfficiencyMonitor()
    fit = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_steps=2,
        callbacks=[monitor, RecordRank(tmp_path, monitor)],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tl.fork_with_one_thread(fit).fit(module, loader(16))
    rows = logged_rows(tmp_path)  # written by rank 0 (global_step stays in the workers)
    assert [r["step"] for r in rows] == ["0", "1"]
    forward = count_flops(TinyClassifier(tome_r=2).model.eval(), tm.images(BATCH))
    assert column(rows, "eff/gflops_per_sample") == pytest.approx([forward / BATCH / 1e9] * 2)
    assert column(rows, "eff/tokens_layer2") == [13, 13]
    records = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["backend"]) for r in records] == [(0, 2, "gloo"), (1, 2, "gloo")]
    for r in records:  # every rank keeps flops_per_batch for ThroughputMonitor, and counts tokens
        assert r["flops_per_batch"] == 3 * forward
        assert r["tokens"] == {"image": [17, 15, 13]}


def test_flops_per_batch_counts_the_training_forward_of_dynamicvit(tmp_path):
    """Issue 13: DynamicViT's eval forward drops tokens, its training forward masks them (all
    tokens computed); the monitor reported the pruned eval count, so MFU came out ~2x too high."""
    from vleff.callbacks import DynamicViT, EfficiencyMonitor
    from vleff.profile import count_flops

    monitor = EfficiencyMonitor()
    module = tl.TinyClassifier()
    trainer = tl.trainer(tmp_path, [DynamicViT(rho=0.5, locations=[1], distill=False), monitor], max_steps=1)
    trainer.fit(module, tl.loader(4))
    x = next(iter(tl.loader(4)))[0]
    with torch.no_grad():
        module.train()
        train_flops = count_flops(module, x)
        module.eval()
        eval_flops = count_flops(module, x)
    assert eval_flops < 0.9 * train_flops
    assert module.flops_per_batch == round(3 * train_flops)
