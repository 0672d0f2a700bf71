"""Hydra configs for DynamicViT and EViT: the experiments compose, train with the method and
compare; fine-tuning from a checkpoint (``init_from``) goes through the same configs."""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from vleff.cli.train import CONFIG_DIR, run

FAST = [
    "trainer.fast_dev_run=true",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "compare.repeats=1",
    "compare.batch_size=4",
    "data.batch_size=8",
    "data.val_fraction=0.05",
]


def _compose(overrides, tmp_path):
    GlobalHydra.instance().clear()
    extra = [f"compare.save_dir={tmp_path}", f"trainer.default_root_dir={tmp_path}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides) + extra)


def _method_row(result, name):
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["baseline", f"trained with {name}"]
    assert rows["baseline"]["flops_ratio"] == 1.0
    return rows[f"trained with {name}"]


def test_evit_experiment_trains_with_the_method(tmp_path):
    cfg = _compose(["experiment=vit_evit"] + FAST, tmp_path)
    assert cfg.callbacks.evit._target_ == "vleff.callbacks.EViT" and cfg.trainer.gradient_clip_val == 1.0
    assert list(cfg.callbacks.evit.locations) == [1, 3, 4]
    # fast_dev_run stops at the schedule's start (keep rate 1); the trained model runs at 0.7
    assert 0.6 < _method_row(run(cfg), "evit")["flops_ratio"] < 0.72  # 0.67x at keep rate 0.7


def test_dynamicvit_experiment_fine_tunes_from_a_checkpoint(tmp_path):
    cfg = _compose(["experiment=vit_dynamicvit"] + FAST, tmp_path)
    assert cfg.callbacks.dynamicvit._target_ == "vleff.callbacks.DynamicViT" and cfg.trainer.gradient_clip_val == 1.0
    torch.manual_seed(0)
    ckpt = tmp_path / "baseline.ckpt"  # what a baseline vleff-train run leaves (its state_dict part)
    torch.save({"state_dict": instantiate(cfg.model, num_classes=10).state_dict(), "epoch": 3}, ckpt)
    cfg = _compose(
        ["experiment=vit_dynamicvit", f"callbacks.dynamicvit.init_from={ckpt}", "callbacks.dynamicvit.distill=true"]
        + FAST,
        tmp_path,
    )
    callback = instantiate(cfg.callbacks.dynamicvit)
    assert callback.init_from == str(ckpt) and callback.kwargs["distill"] is True
    assert 0.58 < _method_row(run(cfg), "dynamicvit")["flops_ratio"] < 0.7  # 0.64x at rho=0.7
