"""Issue 24 item 17: a CLIP ``vleff-train`` run's console — open_clip's tokenizer lines once, and
the progress bar's ``v_num`` as the integer version (``v_num: 0``, not ``v_num: 0.000``)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from omegaconf import OmegaConf

from vleff.cli.train import _with_progress_bar
from vleff.data.captions import clip_tokenizer


def test_open_clip_tokenizer_is_built_once_per_process(caplog):
    with caplog.at_level(logging.INFO):
        # what one CLIP run asks for: training collate, validation collate, zero-shot prompts (x2 epochs)
        tokens = [clip_tokenizer("ViT-B-32", 16)(["a photo of the digit one"]) for _ in range(4)]
    lines = [r for r in caplog.records if "Parsing tokenizer identifier" in r.getMessage()]
    assert len(lines) <= 1  # at most the first call in this process (4 before)
    assert all(torch.equal(t, tokens[0]) for t in tokens)
    assert tokens[0][0, :2].tolist() == [49406, 320] and tokens[0].shape == (1, 16)  # <start> "a", 16 long


def _bar_texts(bar, version: int) -> list[str]:
    """The metric texts Lightning's rich bar renders (``f"{value:.3f}"`` for non-strings)."""
    trainer = SimpleNamespace(
        progress_bar_metrics={"train/loss": 2.5},
        loggers=[SimpleNamespace(version=version)],
        logger=SimpleNamespace(version=version),
    )
    metrics = bar.get_metrics(trainer, None)
    return [f"{k}: {v if isinstance(v, str) else format(v, '.3f')}" for k, v in metrics.items()]


def test_progress_bar_shows_the_version_as_an_integer():
    cfg = OmegaConf.create({"trainer": {"enable_progress_bar": True}})
    (bar,) = _with_progress_bar(cfg, [])
    assert _bar_texts(bar, 0) == ["v_num: 0", "train/loss: 2.500"]
    # a bar the user gives, or none at all, is left as asked
    off = OmegaConf.create({"trainer": {"enable_progress_bar": False}})
    assert _with_progress_bar(off, []) == []
    from lightning.pytorch.callbacks import TQDMProgressBar

    mine = TQDMProgressBar()
    assert _with_progress_bar(cfg, [mine]) == [mine]
