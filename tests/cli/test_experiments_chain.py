"""Issue 24 item 18: the frozen-backbone ViT experiments say when they would train beside a random
backbone, and the reversible and MemVP experiments exist and run."""

from __future__ import annotations

import logging

import pytest
from train_cli_helpers import FitReached, compose_train, stop_at_fit

from vleff.cli.train import run

FAST = [
    "trainer.fast_dev_run=true",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    "compare.repeats=1",
    "compare.batch_size=4",
]


@pytest.fixture
def no_fit(monkeypatch):
    """Trainer.fit records the call and raises FitReached: the checks must fire before any."""
    return stop_at_fit(monkeypatch)


@pytest.mark.parametrize("method", ["lst", "unipt", "vqt", "lora"])
def test_side_experiments_warn_without_a_trained_backbone(method, tmp_path, no_fit, caplog):
    with caplog.at_level(logging.WARNING, logger="vleff.train"), pytest.raises(FitReached):
        run(compose_train([f"experiment=vit_{method}"], tmp_path))
    warned = [r.getMessage() for r in caplog.records if r.name == "vleff.train"]
    assert (
        len(warned) == 1 and f"callbacks.{method}: {method} trains beside a frozen, randomly initialised" in warned[0]
    )
    assert f"callbacks.{method}.init_from=" in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vleff.train"), pytest.raises(FitReached):
        run(
            compose_train(
                [f"experiment=vit_{method}", f"callbacks.{method}.init_from={tmp_path / 'base.ckpt'}"], tmp_path
            )
        )
    assert not [r for r in caplog.records if r.name == "vleff.train"]  # chained to a baseline: quiet


def test_reversible_experiment_trains_and_its_baseline_is_the_reversible_model(tmp_path):
    # a 2-block ViT and a 5 % validation split keep the comparison's accuracy pass short
    cfg = compose_train(
        [
            "experiment=vit_reversible",
            *FAST,
            "data.batch_size=8",
            "data.val_fraction=0.05",
            "+model.model_kwargs={depth: 2}",
        ],
        tmp_path,
    )
    assert cfg.callbacks.reversible.coupling == "revvit"
    result = run(cfg)
    assert [r["name"] for r in result["rows"]] == ["baseline (with reversible)"]


def test_memvp_experiment_trains_only_memvp(tmp_path):
    from vleff.data.digits_vlm import VOCAB

    cfg = compose_train(["experiment=vlm_memvp", *FAST, "data.batch_size=4"], tmp_path)
    assert cfg.model.model.lm.config.vocab_size == len(VOCAB)
    result = run(cfg)
    assert "val/acc" in result["val"]
