"""The CLI's progress bar: Lightning's own, with the logger version shown as the integer it is.

Lightning adds ``v_num`` (the logger's version) to the bar's metrics as an ``int``; the rich
bar formats every non-string metric with ``.3f``, so the console read ``v_num: 0.000``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

__all__ = ["VersionAsTextRichBar", "VersionAsTextTQDMBar", "progress_bar"]


class _VersionAsText:
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        if "v_num" in items and not isinstance(items["v_num"], str):
            items["v_num"] = str(items["v_num"])  # a version, not a measurement: no decimals
        return items


class VersionAsTextRichBar(_VersionAsText, RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` showing ``v_num: 0``, not ``0.000``."""


class VersionAsTextTQDMBar(_VersionAsText, TQDMProgressBar):
    """:class:`~lightning.pytorch.callbacks.TQDMProgressBar` showing ``v_num`` as text."""


def progress_bar() -> ProgressBar:
    """The bar Lightning would pick (rich when installed, else tqdm), with ``v_num`` as text."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return VersionAsTextTQDMBar()
    return VersionAsTextRichBar()
