"""``LoRA``: ``peft`` LoRA adapters on the LightningModule's attention projections, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LoRA(r=8)])

Applied in ``setup`` (before ``configure_optimizers`` and before checkpoint weights are
restored, so the adapters exist when a checkpoint loads); only the adapters (and a timm
classifier head with ``train_head``) train. See :mod:`vleff.methods.lora.core` for the targets and where
``peft`` cannot wrap a module. Checkpoints hold the whole model (the base weights' keys are
renamed by ``peft``: ``...qkv.base_layer.weight``). Which model and an already applied LoRA
follow the rules of every method callback (:mod:`vleff.lightning.targets`): with a frozen
teacher beside the student, ``module="student"`` leaves the teacher (weights, flags) as it was.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    refuse_other_settings,
    resolve_target,
)
from vleff.methods.lora.core import LoRAConfig, apply_lora, lora_applied


class LoRA(InitFromOption, RemovalOption, pl.Callback):
    """Args: ``init_from`` (a checkpoint or ``state_dict`` of the trained model, loaded in
    ``setup`` before the adapters are added) and :class:`vleff.methods.lora.core.LoRAConfig`'s settings:
    ``r`` (rank), ``alpha`` (scale ``alpha / r``), ``dropout`` (on the adapter input),
    ``train_head`` (keep a timm classifier head trainable), ``towers``; ``module``: the model to
    adapt, as an attribute path or module object (default: the one model of the LightningModule
    with a tower ``towers`` names; several are refused, listing them); ``remove_on_teardown``: take
    the adapters out when the run ends, keeping them for a later run (the flags as they were)."""

    settings_config = LoRAConfig

    method = "lora"

    def __init__(
        self,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        **settings: Any,
    ) -> None:
        self.init_removal(remove_on_teardown)
        super().__init__()
        self.config = LoRAConfig.build(**settings)  # bad values fail here, naming the setting
        self.init_initial(init_from)
        self.module = check_module_arg(module)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "lora", self.config)
        self.note_removal(target)
        if lora_applied(target):
            refuse_other_settings("lora", target, self.config)
        else:
            self.load_initial_once(pl_module, target, stage)
            self.apply_removable(target, lambda: apply_lora(target, self.config))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "lora", self.config)

    def state_dict(self) -> dict[str, Any]:
        return self.config.as_dict()


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class LoRAMixin:
    """``use_lora(**settings)`` in ``__init__`` once the backbone exists: ``peft`` LoRA
    (:mod:`vleff.methods.lora.core`) on this module's attention projections, everything else but the
    adapters (and a timm head with ``train_head``) frozen; ``load_from_checkpoint`` then finds
    the adapters before the weights load, as with :class:`vleff.callbacks.LoRA`."""

    def use_lora(self, module: Any = None, **settings: Any) -> None:
        from vleff.methods.lora.core import LoRAConfig, apply_lora

        config = LoRAConfig.build(**settings)
        apply_lora(mixin_target(self, module, "lora", config), config)
