"""``LoHa``: ``peft`` LoHa adapters on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LoHa(r=8)])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.loha.core import LoHaConfig


class LoHa(PeftTuning):
    """Args: :class:`vleff.methods.loha.core.LoHaConfig`'s settings (``r``, ``alpha``,
    ``train_head``, ``towers``) and the shared ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "loha"
    settings_config = LoHaConfig


class LoHaMixin:
    """``use_loha(**settings)`` in ``__init__`` once the backbone exists (see :class:`LoHa`)."""

    def use_loha(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.loha.core import apply_loha

        config = LoHaConfig.build(**settings)
        apply_loha(mixin_target(self, module, "loha", config), config)
