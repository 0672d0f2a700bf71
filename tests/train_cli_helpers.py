"""Shared by the ``vleff-train`` tests: compose the packaged config, and stop before ``Trainer.fit``."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from vleff.cli.train import CONFIG_DIR


def compose_train(overrides: list[str], tmp_path: Path):
    """``train.yaml`` with ``overrides``, its outputs under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[f"trainer.default_root_dir={tmp_path}", f"compare.save_dir={tmp_path}", *overrides],
        )


class FitReached(Exception):
    """Raised by the patched ``Trainer.fit``: the run got past its up-front checks."""


def stop_at_fit(monkeypatch) -> list[int]:
    """Make ``Trainer.fit`` record the call and raise :class:`FitReached`; returns the record."""
    import lightning.pytorch as pl

    calls: list[int] = []

    def fit(self, *args, **kwargs):
        calls.append(1)
        raise FitReached

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    return calls
