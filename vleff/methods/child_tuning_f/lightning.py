"""``ChildTuningF``: Child-Tuning_F on the LightningModule's towers, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.ChildTuningF(reserve_p=0.3)])

The gradients are masked in ``on_before_optimizer_step`` (after the backward and any gradient
accumulation, before the optimizer's moments), so any optimizer ``configure_optimizers`` returns
is served; the draw counter travels in checkpoints (``checkpoint["vleff_selection"]``), so a
resumed run draws the masks the uninterrupted one would have. Checkpoints hold the whole model
(nothing is frozen). Everything else is the selective methods' base
(:class:`vleff.lightning.selection.SelectiveTuning`).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.selection import SelectiveMixin, SelectiveTuning
from vleff.methods.child_tuning_f.core import ChildTuningFConfig


class ChildTuningF(SelectiveTuning):
    """Args: :class:`vleff.methods.child_tuning_f.core.ChildTuningFConfig`'s settings
    (``reserve_p``, ``seed``, ``towers``) and the shared ones of
    :class:`vleff.lightning.selection.SelectiveTuning`."""

    method = "child_tuning_f"
    settings_config = ChildTuningFConfig


class ChildTuningFMixin(SelectiveMixin):
    """``use_child_tuning_f(**settings)`` in ``__init__`` once the backbone exists: the gradients
    are masked in the module's ``on_before_optimizer_step`` (as :class:`ChildTuningF`)."""

    def use_child_tuning_f(self, module: Any = None, **settings: Any) -> None:
        config = ChildTuningFConfig.build(**settings)
        self._use_selection("child_tuning_f", config, module)
