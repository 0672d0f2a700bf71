"""``VPT``: VPT-deep on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.VPT(num_tokens=10)])

Everything but the settings is the shared prompt-method callback
(:class:`vleff.lightning.prompts.PromptTuning`: frozen backbone in eval mode, prompt-only checkpoints
unless ``full_checkpoint``, ``init_from``, ``module=``, ``remove_on_teardown``).
"""

from __future__ import annotations

from typing import Any

from vleff.lightning.prompts import PromptMixin, PromptTuning
from vleff.methods.vpt.core import VPTConfig


class VPT(PromptTuning):
    """Args: :class:`vleff.methods.vpt.core.VPTConfig`'s settings (``num_tokens``, ``dropout``,
    ``towers``) and the shared ones of :class:`vleff.lightning.prompts.PromptTuning`."""

    method = "vpt"
    settings_config = VPTConfig


class VPTMixin(PromptMixin):
    """``use_vpt(train_head=True, full_checkpoint=False, module=None, **settings)`` in ``__init__``
    once the backbone exists (see :class:`VPT`)."""

    def use_vpt(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        self._use_prompts("vpt", train_head, full_checkpoint, VPTConfig.build(**settings), module)
