"""``Reversible``: reversible blocks on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.Reversible(coupling="meft")])
>>> trainer.fit(model, datamodule)        # the LightningModule is not edited

The stack is made reversible in ``setup`` (before ``configure_optimizers`` and before
checkpoint weights are restored, so MEFT's adapters exist when their weights load) and
stays so after ``fit``: the trained weights belong to the reversible network, so
``vleff.apply_reversible`` must be called with the same settings before a
``load_from_checkpoint``-ed model is evaluated (the plain forward is a different function).

Which model, an already applied stack and ``remove_on_teardown`` follow the rules of every
method callback (:mod:`vleff.lightning.targets`): with a frozen teacher beside the student,
``module="student"`` leaves the teacher's forward exactly as it was.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.strategy import check_strategy
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.reversible.core import (
    ReversibleConfig,
    apply_reversible,
)

__all__ = ["Reversible"]


class Reversible(InitFromOption, RemovalOption, pl.Callback):
    """Run the LightningModule's towers (timm ViT/DeiT, open_clip, HF CLIP) as reversible stacks.

    Args:
        remove_on_teardown: restore the plain forward when the run ends (MEFT's trained adapters
            are kept: a later run with this callback re-applies them).
        module: the model to make reversible: attribute path or module object (default: the one
            model of the LightningModule with a tower ``towers`` names; several are refused).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        **settings: :class:`vleff.methods.reversible.core.ReversibleConfig` fields (``coupling``,
            ``lam``, ``beta``, ``towers``, ``adapter``, ``streams``, ``balance``), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    method = "reversible"
    settings_config = ReversibleConfig

    def __init__(
        self,
        remove_on_teardown: bool = False,
        module: ModuleArg = None,
        init_from: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.init_initial(init_from)
        self.config = ReversibleConfig.build(**settings)
        self.init_removal(remove_on_teardown)
        self.module = check_module_arg(module)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, "reversible")
        target = self._target = resolve_target(pl_module, self.module, "reversible", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_reversible(target, self.config))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target if self._target is not None else pl_module)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        record_method(checkpoint, pl_module, self._target, "reversible", self.config)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class ReversibleMixin:
    """``use_reversible(**settings)``: run the module's towers as reversible stacks (call it
    in ``__init__`` once the backbone exists, so ``load_from_checkpoint`` rebuilds the same
    network the weights were trained in). Settings: :class:`vleff.methods.reversible.core.ReversibleConfig`."""

    def use_reversible(self, module: Any = None, **settings: Any) -> None:
        """``module``: the model to make reversible when the module holds several (attribute
        path or module object; :mod:`vleff.lightning.targets`), else refused listing them."""
        from vleff.lightning.targets import check_module_arg, resolve_target

        config = ReversibleConfig.build(**settings)
        apply_reversible(resolve_target(self, check_module_arg(module), "reversible", config), config)
