"""``ParallelAdapter``: the parallel adapter (He et al.) / AdaptFormer on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.ParallelAdapter(bottleneck=64)])

Everything but the settings is the shared additive-tuner callback
(:class:`vleff.lightning.adapters.AdapterTuning`: frozen backbone in eval mode, adapter-only
checkpoints unless ``full_checkpoint``, ``init_from``, ``module=``, ``remove_on_teardown``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.adapters import AdapterMixin, AdapterTuning
from vleff.methods.parallel_adapter.core import ParallelAdapterConfig


class ParallelAdapter(AdapterTuning):
    """Args: :class:`vleff.methods.parallel_adapter.core.ParallelAdapterConfig`'s settings
    (``bottleneck``, ``scale``, ``dropout``, ``reads``, ``train_norms``, ``towers``) and the shared ones of
    :class:`vleff.lightning.adapters.AdapterTuning`."""

    method = "parallel_adapter"
    settings_config = ParallelAdapterConfig


class ParallelAdapterMixin(AdapterMixin):
    """``use_parallel_adapter(train_head=True, full_checkpoint=False, module=None, **settings)`` in
    ``__init__`` once the backbone exists (see :class:`ParallelAdapter`)."""

    def use_parallel_adapter(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        self._use_adapters(
            "parallel_adapter", train_head, full_checkpoint, ParallelAdapterConfig.build(**settings), module
        )
