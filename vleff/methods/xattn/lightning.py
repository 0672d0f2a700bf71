"""``Xattn``: only the cross-attention (and the task head) of the LightningModule's BLIP text
models trains, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.Xattn()])

Everything but the settings is the selective methods' callback base
(:class:`vleff.lightning.selection.SelectiveTuning`: ``init_from``, ``module=``,
``remove_on_teardown``, trainable-only checkpoints unless ``full_checkpoint``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.selection import SelectiveTuning
from vleff.methods.xattn.core import XattnConfig


class Xattn(SelectiveTuning):
    """Args: :class:`vleff.methods.xattn.core.XattnConfig`'s settings (``train_norms``,
    ``train_head``, ``text_models``, ``towers``) and the shared ones of
    :class:`vleff.lightning.selection.SelectiveTuning`."""

    method = "xattn"
    settings_config = XattnConfig


class XattnMixin:
    """``use_xattn(**settings)`` in ``__init__`` once the backbone exists (see :class:`Xattn`)."""

    def use_xattn(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.xattn.core import apply_xattn

        config = XattnConfig.build(**settings)
        apply_xattn(mixin_target(self, module, "xattn", config), config)
