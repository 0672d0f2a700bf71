"""``DoRA``: ``peft`` DoRA adapters on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.DoRA(r=8)])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.dora.core import DoRAConfig


class DoRA(PeftTuning):
    """Args: :class:`vleff.methods.dora.core.DoRAConfig`'s settings (``r``, ``alpha``, ``dropout``,
    ``train_head``, ``towers``) and the shared ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "dora"
    settings_config = DoRAConfig


class DoRAMixin:
    """``use_dora(**settings)`` in ``__init__`` once the backbone exists (see :class:`DoRA`)."""

    def use_dora(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.dora.core import apply_dora

        config = DoRAConfig.build(**settings)
        apply_dora(mixin_target(self, module, "dora", config), config)
