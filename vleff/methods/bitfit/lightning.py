"""``BitFit``: only the biases (and the head) of the LightningModule's towers train, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.BitFit()])

Everything but the settings is the selective methods' callback base
(:class:`vleff.lightning.selection.SelectiveTuning`: ``init_from``, ``module=``,
``remove_on_teardown``, trainable-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.selection import SelectiveTuning
from vleff.methods.bitfit.core import BitFitConfig


class BitFit(SelectiveTuning):
    """Args: :class:`vleff.methods.bitfit.core.BitFitConfig`'s settings (``train_head``,
    ``towers``) and the shared ones of :class:`vleff.lightning.selection.SelectiveTuning`."""

    method = "bitfit"
    settings_config = BitFitConfig


class BitFitMixin:
    """``use_bitfit(**settings)`` in ``__init__`` once the backbone exists (see :class:`BitFit`)."""

    def use_bitfit(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.bitfit.core import apply_bitfit

        config = BitFitConfig.build(**settings)
        apply_bitfit(mixin_target(self, module, "bitfit", config), config)
