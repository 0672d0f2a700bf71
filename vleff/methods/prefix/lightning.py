"""``PrefixTuning``: prefix-tuning / P-tuning v2 on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.PrefixTuning(num_tokens=10)])

Everything but the settings is the shared prompt-method callback
(:class:`vleff.lightning.prompts.PromptTuning`: frozen backbone in eval mode, prompt-only checkpoints
unless ``full_checkpoint``, ``init_from``, ``module=``, ``remove_on_teardown``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.prompts import PromptMixin, PromptTuning
from vleff.methods.prefix.core import PrefixConfig


class PrefixTuning(PromptTuning):
    """Args: :class:`vleff.methods.prefix.core.PrefixConfig`'s settings (``num_tokens``, ``dropout``,
    ``projection``, ``towers``) and the shared ones of :class:`vleff.lightning.prompts.PromptTuning`."""

    method = "prefix"
    settings_config = PrefixConfig


class PrefixMixin(PromptMixin):
    """``use_prefix(train_head=True, full_checkpoint=False, module=None, **settings)`` in ``__init__``
    once the backbone exists (see :class:`PrefixTuning`)."""

    def use_prefix(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        self._use_prompts("prefix", train_head, full_checkpoint, PrefixConfig.build(**settings), module)
