"""``MemVP``: MemVP on an existing Lightning ``Trainer``, one line.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.MemVP(n_mem=256)])

MemVP is applied to the host inside the LightningModule (a ``VisionLanguageModel`` in
``visual_prompt="memvp"`` mode, or a Hugging Face BLIP captioning / VQA model) in ``setup``:
before ``configure_optimizers`` and before checkpoint weights are restored, so its parameters
exist when a checkpoint loads (resuming is exact). With ``freeze_host`` every other weight is
frozen there (the paper trains only the projector and the memory offsets). Which model, an
already applied MemVP and ``remove_on_teardown`` follow the rules of every method callback
(:mod:`vleff.lightning.targets`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.checks import check_bool
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import mixin_target
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    resolve_target,
)
from vleff.methods.memvp.core import (
    MemVPConfig,
    apply_memvp,
    freeze_host_for_memvp,
    memvp_applied,
)


class MemVP(InitFromOption, RemovalOption, pl.Callback):
    """Apply MemVP to the LightningModule's host model (and freeze the host).

    Args:
        freeze_host: ``requires_grad=False`` on every weight but MemVP's.
        remove_on_teardown: restore the plain host (and the ``requires_grad`` flags) when the
            run ends; a later run with this callback re-applies the trained MemVP.
        module: the host: attribute path or module object (default: the one host of the
            LightningModule; several are refused, listing them).
        init_from: a trained model's checkpoint or ``state_dict`` loaded at the start of the first
            ``fit``, before the method is applied (fine-tuning, not resuming).
        **settings: :class:`vleff.methods.memvp.core.MemVPConfig` fields (``n_mem``, ``scale``, ...), validated here.
    """

    method = "memvp"
    settings_config = MemVPConfig

    def __init__(
        self,
        freeze_host: bool = True,
        remove_on_teardown: bool = False,
        module: ModuleArg = None,
        init_from: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self.init_initial(init_from)
        self.config = MemVPConfig.build(**settings)
        self.freeze_host = check_bool("freeze_host", freeze_host)
        self.init_removal(remove_on_teardown)
        self.module = check_module_arg(module)
        self._target: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, "memvp", self.config)
        self.load_initial_once(pl_module, target, stage)
        self.note_removal(target)  # before the host is frozen: teardown puts them back
        self.apply_or_keep(target, self.config, lambda: apply_memvp(target, self.config))
        if self.freeze_host:
            freeze_host_for_memvp(target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None and memvp_applied(self._target):
            record_method(checkpoint, pl_module, self._target, "memvp", self.config)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.remove_at_teardown(self._target if self._target is not None else pl_module)


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
class MemVPMixin:
    """``use_memvp(freeze_host=True, **settings)`` in ``__init__`` once the host exists: MemVP
    applied to the host inside the module (so ``load_from_checkpoint`` rebuilds its parameters
    before the weights load), every other weight frozen when ``freeze_host``."""

    def use_memvp(self, freeze_host: bool = True, module: Any = None, **settings: Any) -> None:
        from vleff.methods.memvp.core import (
            MemVPConfig,
            apply_memvp,
            freeze_host_for_memvp,
        )

        config = MemVPConfig.build(**settings)
        target = mixin_target(self, module, "memvp", config)
        apply_memvp(target, config)
        if check_bool("freeze_host", freeze_host):
            freeze_host_for_memvp(target)
