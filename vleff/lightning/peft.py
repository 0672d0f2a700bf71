"""The Lightning callbacks of the ``peft`` tuner methods (DoRA, IA³, AdaLoRA) on one base, and
``PEFT(method=...)``, the one callback that takes the tuner by name.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.PEFT(method="dora", r=8)])
>>> trainer = L.Trainer(callbacks=[vleff.callbacks.DoRA(r=8)])   # the same

What the base does, for every tuner:

* ``setup``: loads ``init_from`` (the trained model's weights, before the adapters exist), then
  applies the method through its registry entry (before ``configure_optimizers`` and before a
  checkpoint's weights load, so the adapters exist then); which model, an already applied
  method and ``remove_on_teardown`` follow the rules of every method callback
  (:mod:`vleff.lightning.targets`);
* checkpoints are **adapter-only** unless ``full_checkpoint=True``: the frozen base weights of the
  adapted model are left out (:func:`vleff.side.peft_tuners.frozen_base_keys`), the adapters,
  trainable heads and everything else kept; resuming needs the same base model (the module builds
  it as it did), so ``strict_loading`` is turned off and the adapter keys are checked on load;
* the method and its settings are recorded in the checkpoint (:func:`record_method`), so a
  module calling :func:`vleff.callbacks.restore_methods` in ``on_load_checkpoint`` loads it back.

Subclasses (one per method, beside the method) set ``method`` and ``settings_config``; AdaLoRA's
adds its allocator step and aux loss. This module names no method: it reaches them through the
registry by name.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.checks import check_bool
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target
from vleff.lightning.restore import ADAPTERS_ONLY, record_method
from vleff.lightning.strategy import check_strategy, whole_checkpoint
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    method_label,
    refuse_other_settings,
    resolve_target,
)
from vleff.registry import get_method, peft_methods
from vleff.side.peft_tuners import frozen_base_keys


def adapters_only_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen base weights of every adapted model from ``checkpoint["state_dict"]``."""
    frozen = frozen_base_keys(pl_module)
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
    checkpoint[ADAPTERS_ONLY] = sorted(checkpoint["state_dict"])


def check_adapters_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``KeyError`` when an adapter-only checkpoint lacks a key the module has outside its frozen
    base (another tuner or setting): ``strict`` loading is off for such checkpoints."""
    if ADAPTERS_ONLY not in checkpoint:
        return
    have = set(checkpoint.get("state_dict", {}))
    frozen = frozen_base_keys(pl_module)
    missing = sorted(k for k in pl_module.state_dict() if k not in frozen and k not in have)
    if missing:
        raise KeyError(
            f"the adapter-only checkpoint lacks keys {missing[:5]} (the adapters and the module's own "
            "weights beside its frozen base model); resume with the peft tuner and settings it was trained with"
        )


class PeftTuning(InitFromOption, RemovalOption, pl.Callback):
    """Base of the ``peft`` tuner callbacks (see the module docstring).

    Args: ``init_from`` (a checkpoint or ``state_dict`` of the trained model, loaded in ``setup``
    before the adapters are added), ``module`` (the model to adapt: attribute path or module
    object; default the one model holding a tower ``towers`` names), ``remove_on_teardown``,
    ``full_checkpoint`` (keep the frozen base weights in checkpoints), and the method's settings."""

    method: str = ""
    settings_config: type = type(None)

    def __init__(
        self,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        full_checkpoint: bool = False,
        **settings: Any,
    ) -> None:
        self.init_removal(remove_on_teardown)
        super().__init__()
        self.config = self.settings_config.build(**settings)  # bad values fail here, naming the setting
        self.full_checkpoint = check_bool("full_checkpoint", full_checkpoint)
        self.init_initial(init_from)
        self.module = check_module_arg(module)
        self._target: Any = None

    #: settings the callback drives itself (not compared with an earlier application)
    def driven(self) -> tuple[str, ...]:
        return ()

    def apply_config(self, trainer: pl.Trainer) -> Any:
        """The config ``setup`` applies (the callback's; AdaLoRA completes ``total_step``)."""
        return self.config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, self.method)
        entry = get_method(self.method)
        target = self._target = resolve_target(pl_module, self.module, self.method, self.config)
        self.note_removal(target)
        if entry.is_applied(target):
            refuse_other_settings(self.method, target, self.config, driven=self.driven())
        else:
            self.load_initial_once(pl_module, target, stage)
            config = self.apply_config(trainer)
            self.apply_removable(target, lambda: entry.apply(target, config))
        if not self.full_checkpoint:
            pl_module.strict_loading = False  # the frozen base keys are not in an adapter-only checkpoint

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not (self.full_checkpoint or whole_checkpoint(trainer)):
            adapters_only_checkpoint(pl_module, checkpoint)
        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, self.method, self.config)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_adapters_checkpoint(pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return self.config.as_dict()


class PEFT(PeftTuning):
    """``PEFT(method="dora", **settings)``: the callback of the ``peft`` tuner ``method``
    (any of :func:`vleff.registry.peft_methods`: ``"lora"``, ``"dora"``, ``"ia3"``, ``"adalora"``,
    ``"loha"``, ``"lokr"``, ``"oft"`` ...) with its settings: an instance of that
    method's own callback class (``vleff.callbacks.DoRA`` ...), which this constructs."""

    def __new__(cls, method: str, **kwargs: Any) -> Any:  # type: ignore[misc]
        tuners = peft_methods()
        if method not in tuners:
            raise ValueError(f"method={method!r} is not a peft tuner vleff offers; use one of {', '.join(tuners)}")
        return get_method(method).load_callback()(**kwargs)


class PeftMixin:
    """``use_peft(method, **settings)`` in ``__init__`` once the backbone exists: the ``peft``
    tuner ``method`` on this module's model (everything but the adapters, and a timm head with
    ``train_head``, frozen), so ``load_from_checkpoint`` finds the adapters before the weights load."""

    def use_peft(self, method: str, module: Any = None, **settings: Any) -> None:
        tuners = peft_methods()
        if method not in tuners:
            raise ValueError(f"method={method!r} is not a peft tuner vleff offers; use one of {', '.join(tuners)}")
        entry = get_method(method)
        config = entry.config.build(**settings)
        assert entry.apply is not None
        entry.apply(mixin_target(self, module, method, config), config)


def label(method: str) -> str:
    return method_label(method)
