"""``IA3``: ``peft`` IA3 vectors on the LightningModule's attention projections and MLPs, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.IA3()])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.ia3.core import IA3Config


class IA3(PeftTuning):
    """Args: :class:`vleff.methods.ia3.core.IA3Config`'s settings (``mlp``,
    ``train_head``, ``towers``) and the shared ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "ia3"
    settings_config = IA3Config


class IA3Mixin:
    """``use_ia3(**settings)`` in ``__init__`` once the backbone exists (see :class:`IA3`)."""

    def use_ia3(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.ia3.core import apply_ia3

        config = IA3Config.build(**settings)
        apply_ia3(mixin_target(self, module, "ia3", config), config)
