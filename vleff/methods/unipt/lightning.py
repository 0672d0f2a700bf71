"""Lightning callback and mixin of UniPT: the side-method base with UniPT's settings."""

from __future__ import annotations

from typing import Any

from vleff.lightning.side import SideMixin, SideTuning
from vleff.methods.unipt.core import UniPTConfig


class UniPT(SideTuning):
    """UniPT on the LightningModule's towers (see :mod:`vleff.methods.unipt.core`).

    Args: as :class:`LadderSideTuning`; ``**settings``: :class:`vleff.methods.unipt.core.UniPTConfig`
    fields (``factor``, ``towers``).
    """

    method = "unipt"
    settings_config = UniPTConfig


class UniPTMixin(SideMixin):
    """``use_unipt(train_head=True, full_checkpoint=False, **settings)``: UniPT
    (:mod:`vleff.methods.unipt.core`) on this module's towers, backbone frozen."""

    def use_unipt(
        self, train_head: bool = True, full_checkpoint: bool = False, module: Any = None, **settings: Any
    ) -> None:
        from vleff.methods.unipt.core import UniPTConfig

        self._use_side("unipt", train_head, full_checkpoint, UniPTConfig.build(**settings), module=module)
