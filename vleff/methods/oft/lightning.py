"""``OFT``: ``peft`` OFT rotations on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.OFT(block_size=32)])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.oft.core import OFTConfig


class OFT(PeftTuning):
    """Args: :class:`vleff.methods.oft.core.OFTConfig`'s settings (``block_size``, ``coft``, ``eps``,
    ``cayley_neumann``, ``train_head``, ``towers``) and the shared ones of
    :class:`vleff.lightning.peft.PeftTuning`."""

    method = "oft"
    settings_config = OFTConfig


class OFTMixin:
    """``use_oft(**settings)`` in ``__init__`` once the backbone exists (see :class:`OFT`)."""

    def use_oft(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.oft.core import apply_oft

        config = OFTConfig.build(**settings)
        apply_oft(mixin_target(self, module, "oft", config), config)
