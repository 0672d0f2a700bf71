"""``QLoRA``: a 4-bit NF4 base with ``peft`` LoRA on the LightningModule's block linear layers, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.QLoRA(r=64)])

Everything but the settings is the shared ``peft`` tuner callback
(:class:`vleff.lightning.peft.PeftTuning`: ``init_from``, ``module=``, ``remove_on_teardown``,
adapter-only checkpoints unless ``full_checkpoint`` — the 4-bit base is rebuilt from the model the
module builds, so a checkpoint holds only the adapters).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.peft import PeftTuning
from vleff.methods.qlora.core import QLoRAConfig


class QLoRA(PeftTuning):
    """Args: :class:`vleff.methods.qlora.core.QLoRAConfig`'s settings (``r``, ``alpha``, ``dropout``,
    ``block_size``, ``scaler_block_size``, ``keep_original``, ``train_head``, ``towers``) and the
    shared ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "qlora"
    settings_config = QLoRAConfig


class QLoRAMixin:
    """``use_qlora(**settings)`` in ``__init__`` once the backbone exists (see :class:`QLoRA`)."""

    def use_qlora(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.qlora.core import apply_qlora

        config = QLoRAConfig.build(**settings)
        apply_qlora(mixin_target(self, module, "qlora", config), config)
