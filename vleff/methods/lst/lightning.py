"""Lightning callback and mixin of LST (ladder side tuning): the side-method base with LST's settings."""

from __future__ import annotations

from typing import Any

from vleff.lightning.mixin import mixin_target
from vleff.lightning.side import SideMixin, SideTuning
from vleff.lightning.targets import (
    ModuleArg,
)
from vleff.methods.lst.core import LSTConfig


class LadderSideTuning(SideTuning):
    """LST on the LightningModule's towers: the side network trains, the backbone is frozen.

    Args:
        train_head: keep a timm classifier head trainable (it reads the pooled features only).
        full_checkpoint: save the whole model in checkpoints (default: the side state only).
        remove_on_teardown: restore the plain model (and the ``requires_grad`` flags) when the
            run ends; a later run with this callback re-applies the trained LST.
        init_from: a Lightning checkpoint or ``state_dict`` of the trained backbone, loaded in
            ``setup`` before LST is built (not a resume: ``Trainer.fit(ckpt_path=...)`` is).
        module: the model to tune: attribute path or module object (default: the one model of
            the LightningModule with a tower ``towers`` names; several are refused).
        **settings: :class:`vleff.methods.lst.core.LSTConfig` fields (``reduction``, ``side_heads``,
            ``temperature``, ``towers``). ``init="fisher"`` needs data: use
            :func:`vleff.methods.lst.core.fisher_information` and :func:`vleff.apply_lst` before ``fit``
            (the callback then only freezes).
    """

    method = "lst"
    settings_config = LSTConfig

    def __init__(
        self,
        train_head: bool = True,
        full_checkpoint: bool = False,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        module: ModuleArg = None,
        **settings: Any,
    ) -> None:
        super().__init__(train_head, full_checkpoint, remove_on_teardown, init_from, module, **settings)
        if self.config.init == "fisher":
            raise ValueError(
                "LadderSideTuning(init='fisher') has no data to compute the Fisher information from; "
                "call vleff.apply_lst(module, init='fisher', fisher=fisher_information(...)) before "
                "fit (the callback keeps it), or use init='magnitude'"
            )


class LSTMixin(SideMixin):
    """``use_lst(train_head=True, full_checkpoint=False, fisher=None, **settings)``: LST
    (:mod:`vleff.methods.lst.core`) on this module's towers, backbone frozen."""

    def use_lst(
        self,
        train_head: bool = True,
        full_checkpoint: bool = False,
        fisher: Any = None,
        module: Any = None,
        **settings: Any,
    ) -> None:
        from vleff.methods.lst.core import LSTConfig, apply_lst

        config = LSTConfig.build(**settings)
        target = mixin_target(self, module, "lst", config)
        apply_lst(target, config, fisher=fisher)  # errors name init/fisher mismatches
        self._use_side("lst", train_head, full_checkpoint, config, apply=False, module=target)
