"""``AdaLoRA``: ``peft`` AdaLoRA on the LightningModule's attention projections, with its rank
budget stepped and its orthogonal regulariser added to the loss.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.AdaLoRA(init_r=12, target_r=8)], max_steps=1000)

On top of the shared ``peft`` tuner callback (:class:`vleff.lightning.peft.PeftTuning`):

* ``total_step`` defaults to the trainer's ``max_steps`` (a run without ``max_steps`` must give it);
* after every optimizer step (``on_train_batch_end`` when the trainer's ``global_step`` moved) it
  calls ``peft``'s ``update_and_allocate`` with the number of optimizer steps done, before the next
  step's ``zero_grad`` (the importance scores read the gradients): the ranks fall to the budget;
* the orthogonal regulariser that ``peft`` adds only to an output with ``.loss`` is added to the
  ``training_step`` loss through vleff's aux-loss wrapper (:class:`vleff.lightning.aux_loss.AuxLoss`,
  logged as ``train/aux/adalora_orth``), as DynamicViT's losses are;
* the allocator's smoothed scores and rank pattern are in the callback's state, so a resumed run
  allocates as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from vleff.lightning.aux_loss import AuxLoss
from vleff.lightning.mixin import AuxLossMixin
from vleff.lightning.peft import PeftTuning
from vleff.lightning.targets import ModuleArg
from vleff.methods.adalora.core import (
    AdaLoRAConfig,
    allocator_state,
    load_allocator_state,
    update_and_allocate,
)


class AdaLoRA(PeftTuning, AuxLoss):
    """Args: :class:`vleff.methods.adalora.core.AdaLoRAConfig`'s settings (``init_r``, ``target_r``,
    ``alpha``, ``dropout``, ``total_step``, ``tinit``, ``tfinal``, ``delta_t``, ``beta1``, ``beta2``,
    ``orth_reg_weight``, ``train_head``, ``towers``), ``log`` (log the regulariser) and the shared
    ones of :class:`vleff.lightning.peft.PeftTuning`."""

    method = "adalora"
    settings_config = AdaLoRAConfig

    def __init__(
        self,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        full_checkpoint: bool = False,
        log: bool = True,
        **settings: Any,
    ) -> None:
        super().__init__(init_from, module, remove_on_teardown, full_checkpoint, **settings)
        AuxLoss.__init__(self, log=log)
        self._last_step: int | None = None
        self._pending_state: dict[str, Any] | None = None

    def driven(self) -> tuple[str, ...]:
        return ("total_step",) if self.config.total_step is None else ()

    def apply_config(self, trainer: pl.Trainer) -> Any:
        if self.config.total_step is not None:
            return self.config
        if trainer.max_steps is None or trainer.max_steps < 1:
            raise ValueError(
                "AdaLoRA: total_step=None and the trainer has no max_steps; the rank budget schedule needs "
                "the number of optimizer steps: give AdaLoRA(total_step=...) or Trainer(max_steps=...)"
            )
        return self.config.replace(total_step=trainer.max_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        PeftTuning.setup(self, trainer, pl_module, stage)
        AuxLoss.setup(self, trainer, pl_module, stage)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        AuxLoss.teardown(self, trainer, pl_module, stage)
        PeftTuning.teardown(self, trainer, pl_module, stage)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps done: the last one of the run fixes the budget
        if step != self._last_step and step > 0:
            update_and_allocate(self._target, step)
        self._last_step = step

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._target is not None:
            from vleff.side.peft_tuners import holder

            if holder(self._target, self.method) is not None:
                state["allocator"] = allocator_state(self._target)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "allocator" in state_dict and self._target is not None:
            load_allocator_state(self._target, state_dict["allocator"])


class AdaLoRAMixin(AuxLossMixin):
    """``use_adalora(**settings)`` in ``__init__`` once the backbone exists; add
    ``self.vleff_aux_loss()`` (the orthogonal regulariser) to the loss and call
    ``vleff.methods.adalora.update_and_allocate(model, step)`` after every optimizer step."""

    def use_adalora(self, module: Any = None, **settings: Any) -> None:
        from vleff.lightning.mixin import mixin_target
        from vleff.methods.adalora.core import apply_adalora

        config = AdaLoRAConfig.build(**settings)
        apply_adalora(mixin_target(self, module, "adalora", config), config)
