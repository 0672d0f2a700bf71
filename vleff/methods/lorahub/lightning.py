"""``LoRAHub``: compose trained LoRA modules into the LightningModule's model when a run starts.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.LoRAHub(modules=["rot90.pt", "rot180.pt"], examples=few_shot)])
>>> trainer.validate(module, val_loader)   # the composed model; callback.result holds the weights

Why a callback at all, for a method that trains nothing: LoRAHub's composition is a starting
point a Lightning run goes on from — validate or test the composed model, or fit whatever the
module trains on top of it (a head on the target task with ``train_head=True``, or the composite
factors themselves, which train as LoRA's do). The callback composes in ``setup`` (before
``configure_optimizers``, so the optimizer sees the composite factors, and before a checkpoint's
weights load, so a resumed run loads its trained factors into them); the search runs where the
model is at ``setup`` (the CPU unless the module moved it), on the ``examples`` the callback was
given (moved to the model's device). A later ``setup`` of the same callback (``trainer.validate``
after ``fit`` with ``remove_on_teardown``) composes with the weights it found, without searching again.

Checkpoints are adapter-only unless ``full_checkpoint=True`` (:class:`vleff.lightning.peft.PeftTuning`).
Unlike the other methods, the callback does not record itself for
:func:`vleff.callbacks.restore_methods`: re-applying LoRAHub needs its modules, which a checkpoint
does not hold. To load one without the callback: ``vleff.apply_lorahub(model, modules=...,
weights=result.weights)`` with the training settings, then ``load_state_dict`` (``strict=False``
for an adapter-only checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from vleff.checks import check_bool
from vleff.lightning.mixin import mixin_target
from vleff.lightning.peft import PeftTuning, adapters_only_checkpoint
from vleff.lightning.targets import ModuleArg, refuse_other_settings, resolve_target
from vleff.methods.lorahub.core import (
    NAME,
    Examples,
    LoRAHubConfig,
    LoRAHubResult,
    apply_lorahub,
    lorahub_applied,
)


class LoRAHub(PeftTuning):
    """Args: ``modules`` (the LoRA modules: state dicts or files), ``examples`` (few-shot
    ``(inputs, targets)`` batches or a ``loss_fn(model)``; not with ``weights``), ``progress`` (a
    tqdm bar over the search), :class:`vleff.methods.lorahub.core.LoRAHubConfig`'s settings
    (``budget``, ``l1``, ``bound``, ``alpha``, ``seed``, ``weights``, ``train_head``,
    ``reference_loss``) and the shared ones of :class:`vleff.lightning.peft.PeftTuning`
    (``init_from``, ``module``, ``remove_on_teardown``, ``full_checkpoint``). ``result`` holds
    what the composition found (:class:`vleff.methods.lorahub.core.LoRAHubResult`)."""

    #: why the callback does not record itself for ``restore_methods`` (the module docstring)
    not_recorded = "re-applying LoRAHub needs its LoRA modules, which a checkpoint does not hold"

    method = NAME
    settings_config = LoRAHubConfig

    def __init__(
        self,
        modules: Sequence[Any] | None = None,
        examples: Examples | None = None,
        progress: bool = False,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        full_checkpoint: bool = False,
        **settings: Any,
    ) -> None:
        super().__init__(init_from, module, remove_on_teardown, full_checkpoint, **settings)
        if modules is None or len(modules) == 0:
            raise ValueError(f"modules={modules!r} is not allowed; LoRAHub composes at least one LoRA module")
        if (examples is None) == (self.config.weights is None):
            raise ValueError(
                "give LoRAHub either examples (few-shot batches or a loss_fn, to search the weights) or "
                "weights=[...] (to compose without a search); got "
                f"examples={'given' if examples is not None else None}, weights={self.config.weights}"
            )
        self.modules = list(modules)
        self.examples = examples
        self.progress = check_bool("progress", progress)
        self.result: LoRAHubResult | None = None

    def _driven(self) -> tuple[str, ...]:
        return ("weights",) if self.config.weights is None else ()  # found by the search, not given

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = self._target = resolve_target(pl_module, self.module, self.method, self.config)
        self.note_removal(target)
        if lorahub_applied(target):
            refuse_other_settings(self.method, target, self.config, driven=self._driven())
        else:
            self.load_initial_once(pl_module, target, stage)
            self.apply_removable(target, lambda: self._compose(target))
        if not self.full_checkpoint:
            pl_module.strict_loading = False  # the frozen base keys are not in an adapter-only checkpoint

    def _compose(self, target: Any) -> None:
        if self.result is not None and self.config.weights is None:  # searched before: the same weights
            apply_lorahub(target, self.config.replace(weights=self.result.weights), modules=self.modules)
            return
        self.result = apply_lorahub(
            target, self.config, modules=self.modules, examples=self.examples, progress=self.progress
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # not recorded for restore_methods, which cannot re-apply without the modules (module docstring)
        if not self.full_checkpoint:
            adapters_only_checkpoint(pl_module, checkpoint)


class LoRAHubMixin:
    """``use_lorahub(modules, examples=..., **settings)`` in ``__init__`` once the backbone exists:
    the composition applied to this module's model (:func:`vleff.methods.lorahub.core.apply_lorahub`),
    so ``load_from_checkpoint`` finds the composite factors before the weights load (give the
    weights found, ``weights=...``, to rebuild without a search). Returns the result."""

    def use_lorahub(
        self,
        modules: Sequence[Any] | None = None,
        examples: Examples | None = None,
        module: Any = None,
        progress: bool = False,
        **settings: Any,
    ) -> LoRAHubResult:
        config = LoRAHubConfig.build(**settings)
        target = mixin_target(self, module, NAME, config)
        return apply_lorahub(target, config, modules=modules, examples=examples, progress=progress)
