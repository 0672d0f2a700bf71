"""``APrompt``: attention prompts on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.APrompt(kv_tokens=10)])

Everything but the settings is the shared prompt-method callback
(:class:`vleff.lightning.prompts.PromptTuning`: frozen backbone in eval mode, prompt-only checkpoints
unless ``full_checkpoint``, ``init_from``, ``module=``, ``remove_on_teardown``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.prompts import PromptMixin, PromptTuning
from vleff.methods.aprompt.core import APromptConfig


class APrompt(PromptTuning):
    """Args: :class:`vleff.methods.aprompt.core.APromptConfig`'s settings (``kv_tokens``,
    ``num_tokens``, ``dropout``, ``towers``) and the shared ones of
    :class:`vleff.lightning.prompts.PromptTuning`."""

    method = "aprompt"
    settings_config = APromptConfig


class APromptMixin(PromptMixin):
    """``use_aprompt(train_head=True, full_checkpoint=False, module=None, **settings)`` in ``__init__``
    once the backbone exists (see :class:`APrompt`)."""

    def use_aprompt(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        self._use_prompts("aprompt", train_head, full_checkpoint, APromptConfig.build(**settings), module)
