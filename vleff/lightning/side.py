"""Lightning callbacks of the side methods beside a frozen backbone: ``LadderSideTuning`` (LST)
and ``UniPT`` here, ``VisualQueryTuning`` in :mod:`vleff.methods.vqt.lightning`, on one shared base.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LadderSideTuning(reduction=8)])
>>> trainer = L.Trainer(callbacks=[vleff.callbacks.UniPT(factor=2)])

What the base does, for every side method:

* ``setup``: loads ``init_from`` (trained backbone weights, when given: a frozen random
  backbone is useless, and LST initialises its side network from the backbone), then applies
  the method (before ``configure_optimizers`` and before checkpoint weights
  are restored, so the side parameters exist when a checkpoint loads) and freezes the backbone;
* ``on_train_start``: refuses any backbone weight that requires grad (the module's own code or
  another method unfroze it): it would put the backbone's activations in the graph and silently
  destroy the memory saving; then puts the backbone in eval mode (dropout and drop-path off)
  while the side modules train, again at every training batch (Lightning sets train mode back
  after validation);
* checkpoints leave out **only the frozen backbone** (:func:`vleff.side.side_state_dict`: the
  side modules, trainable heads and everything of the module beside the backbone, a BatchNorm's
  running statistics included) unless ``full_checkpoint=True``. Resuming needs the same backbone (the
  module builds it as it did, e.g. from the same pretrained weights); the side keys are checked
  on load, the backbone's are kept from the module (``strict_loading`` is turned off for that);
* which model, an already applied method and ``remove_on_teardown`` follow the rules of every
  method callback (:mod:`vleff.lightning.targets`): ``module=`` picks the model when the
  LightningModule holds several (a frozen teacher is then left exactly as it was); a method
  applied with other settings is refused; removal at teardown keeps the trained side state (a
  later run with this callback re-applies the trained method) and restores ``requires_grad``
  as it was before the callback froze the backbone.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.checks import check_bool
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target, next_hook
from vleff.lightning.restore import SIDE_ONLY
from vleff.lightning.strategy import check_strategy, whole_checkpoint
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    method_label,
    refuse_other_settings,
    resolve_target,
)
from vleff.registry import get_method
from vleff.side.common import (
    backbone_eval,
    freeze_backbone,
    refuse_unfrozen_backbone,
    side_state_dict,
)


def side_only_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Keep only the side state in ``checkpoint["state_dict"]`` (in place) and mark it."""
    keep = set(side_state_dict(pl_module))
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k in keep}
    checkpoint[SIDE_ONLY] = sorted(checkpoint["state_dict"])


def check_side_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``KeyError`` if a side-only checkpoint lacks a side key the module has (a different
    method or setting): the backbone keys are not in it, so ``strict`` loading cannot tell."""
    if SIDE_ONLY not in checkpoint:
        return
    have = set(checkpoint.get("state_dict", {}))
    missing = sorted(k for k in side_state_dict(pl_module) if k not in have)
    if missing:
        raise KeyError(
            f"the side-only checkpoint lacks side keys {missing[:5]} (the side modules and the "
            "module's own weights beside its frozen backbone); resume with the same side method and settings "
            "it was trained with"
        )


class SideTuning(InitFromOption, RemovalOption, pl.Callback):
    """Base of the side-method callbacks (see the module docstring). Subclasses set ``method``
    (the registry name) and ``settings_config``."""

    method: str = ""
    settings_config: type = type(None)

    def __init__(
        self,
        train_head: bool = True,
        full_checkpoint: bool = False,
        remove_on_teardown: bool = False,
        init_from: str | None = None,
        module: ModuleArg = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.config = self.settings_config.build(**settings)
        self.train_head = check_bool("train_head", train_head)
        self.full_checkpoint = check_bool("full_checkpoint", full_checkpoint)
        self.init_removal(remove_on_teardown)
        self.init_initial(init_from)
        self.module = check_module_arg(module)
        self._target: Any = None

    @property
    def _method(self):
        return get_method(self.method)

    def _target_of(self, pl_module: nn.Module) -> nn.Module:
        return self._target if self._target is not None else pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, self.method)
        target = self._target = resolve_target(pl_module, self.module, self.method, self.config)
        self.note_removal(target)  # before anything is frozen: teardown puts them back
        if self._method.is_applied(target):
            refuse_other_settings(self.method, target, self.config)
        else:
            self.load_initial_once(pl_module, target, stage)
            self.apply_removable(target, lambda: self._method.apply(target, self.config))
        freeze_backbone(target, train_head=self.train_head)
        if not self.full_checkpoint:
            pl_module.strict_loading = False  # the backbone keys are not in a side-only checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_unfrozen_backbone(self._target_of(pl_module), method_label(self.method), self.train_head)
        backbone_eval(self._target_of(pl_module))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        backbone_eval(self._target_of(pl_module))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not (self.full_checkpoint or whole_checkpoint(trainer)):
            side_only_checkpoint(pl_module, checkpoint)
        from vleff.lightning.restore import record_method

        record_method(checkpoint, pl_module, self._target, self.method, self.config)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_side_checkpoint(pl_module, checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target_of(pl_module))


class SideMixin:
    """Shared by the VQT, LST and UniPT mixins: the method applied and the backbone frozen in
    ``use_*``; at fit start an unfrozen backbone weight is refused; the backbone stays in eval
    mode in training; checkpoints leave out only the frozen backbone unless ``full_checkpoint``."""

    _vleff_side: tuple[str, bool, bool] | None = None  # (method, train_head, full_checkpoint)

    def _use_side(
        self, method: str, train_head: bool, full_checkpoint: bool, config: Any, apply: bool = True, module: Any = None
    ) -> None:
        from vleff.registry import get_method
        from vleff.side.common import freeze_backbone

        self._vleff_side = (
            method,
            check_bool("train_head", train_head),
            check_bool("full_checkpoint", full_checkpoint),
        )
        target = mixin_target(self, module, method, config)
        if apply:
            get_method(method).apply(target, config)
        freeze_backbone(target, train_head=train_head)
        if not full_checkpoint:
            self.strict_loading = False  # the backbone keys are not in a side-only checkpoint

    def on_train_start(self) -> None:
        next_hook(self, SideMixin, "on_train_start")
        if self._vleff_side is not None:
            from vleff.side.common import backbone_eval, refuse_unfrozen_backbone

            refuse_unfrozen_backbone(self, method_label(self._vleff_side[0]), self._vleff_side[1])  # type: ignore[arg-type]
            backbone_eval(self)  # type: ignore[arg-type]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        out = next_hook(self, SideMixin, "on_train_batch_start", batch, batch_idx)
        if self._vleff_side is not None:
            from vleff.side.common import backbone_eval

            backbone_eval(self)  # type: ignore[arg-type]
        return out

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, SideMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_side is not None and not self._vleff_side[2]:
            side_only_checkpoint(self, checkpoint)  # type: ignore[arg-type]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, SideMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_side is not None:
            check_side_checkpoint(self, checkpoint)  # type: ignore[arg-type]
