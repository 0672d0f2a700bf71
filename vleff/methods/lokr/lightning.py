"""``LoKr``: ``peft`` LoKr adapters on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LoKr(r=8)])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.lokr.core import LoKrConfig


class LoKr(PeftTuning):
    """Args: :class:`vleff.methods.lokr.core.LoKrConfig`'s settings (``r``, ``alpha``,
    ``train_head``, ``towers``) and the shared ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "lokr"
    settings_config = LoKrConfig


class LoKrMixin:
    """``use_lokr(**settings)`` in ``__init__`` once the backbone exists (see :class:`LoKr`)."""

    def use_lokr(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.lokr.core import apply_lokr

        config = LoKrConfig.build(**settings)
        apply_lokr(mixin_target(self, module, "lokr", config), config)
