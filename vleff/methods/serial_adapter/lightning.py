"""``SerialAdapter``: Houlsby's serial adapter on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.SerialAdapter(bottleneck=64)])

Everything but the settings is the shared additive-tuner callback
(:class:`vleff.lightning.adapters.AdapterTuning`: frozen backbone in eval mode, adapter-only
checkpoints unless ``full_checkpoint``, ``init_from``, ``module=``, ``remove_on_teardown``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.adapters import AdapterMixin, AdapterTuning
from vleff.methods.serial_adapter.core import SerialAdapterConfig


class SerialAdapter(AdapterTuning):
    """Args: :class:`vleff.methods.serial_adapter.core.SerialAdapterConfig`'s settings
    (``bottleneck``, ``init_std``, ``train_norms``, ``towers``) and the shared ones of
    :class:`vleff.lightning.adapters.AdapterTuning`."""

    method = "serial_adapter"
    settings_config = SerialAdapterConfig


class SerialAdapterMixin(AdapterMixin):
    """``use_serial_adapter(train_head=True, full_checkpoint=False, module=None, **settings)`` in
    ``__init__`` once the backbone exists (see :class:`SerialAdapter`)."""

    def use_serial_adapter(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        self._use_adapters("serial_adapter", train_head, full_checkpoint, SerialAdapterConfig.build(**settings), module)
