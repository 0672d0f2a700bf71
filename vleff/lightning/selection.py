"""The Lightning callbacks of the selective methods (BitFit, FishMask, Child-Tuning, Xattn) on one base.

>>> trainer = L.Trainer(callbacks=[vleff.callbacks.BitFit()])
>>> trainer = L.Trainer(callbacks=[vleff.callbacks.FishMask(keep_ratio=0.005)])

What the base does, for every selective method (:mod:`vleff.side.selection`):

* ``setup``: loads ``init_from``, then applies the method through its registry entry (before
  ``configure_optimizers``, so the flags are set when the optimizer is built, and before a
  checkpoint's weights load); which model, an already applied method and ``remove_on_teardown``
  follow the rules of every method callback (:mod:`vleff.lightning.targets`);
* ``on_train_start``: a method whose masks come from the Fisher information
  (``fisher_select`` in the subclass) computes them on the first ``fisher_batches`` training
  batches (``None``: one pass over the whole training dataloader, streamed), unless a resumed
  checkpoint brought them; on several processes rank 0's masks are broadcast, so every rank
  trains the same entries. The loss is the module's own ``training_step(batch, i)`` (its
  ``self.log`` calls silenced meanwhile) unless ``loss_fn(module, batch)`` is given. Then every
  optimizer gets the post-step hook of :func:`vleff.side.selection.attach_masked_step` (FishMask:
  the masked-off entries put back after each step);
* the gradients are masked in ``on_before_optimizer_step`` (fixed masks, or Child-Tuning_F's
  fresh Bernoulli draw, advancing its counter): after the whole backward (accumulated micro-batches
  included) and before the optimizer reads them, so the moments of any optimizer the user
  configures see the masked gradient, as in Child-Tuning's ``ChildTuningAdamW``. Not in an
  optimizer step pre-hook: Lightning calls ``optimizer.step(closure)`` and the backward runs
  inside it, after the pre-hooks. This is before Lightning's gradient clipping (FishMask's
  reference zeroes the masked gradients right after backward; Child-Tuning's clips the full
  gradient, then masks: ``docs/fidelity.md``);
* checkpoints keep only what trains (the frozen parameters of the selected model are left out)
  unless ``full_checkpoint=True``, and always the masks and Child-Tuning_F's draw counter
  (``checkpoint["vleff_selection"]``), so a resumed run trains the same entries.

Subclasses (one per method, beside the method) set ``method`` and ``settings_config``; this module
names no method.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from vleff.checks import check_bool
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import next_hook
from vleff.lightning.restore import ADAPTERS_ONLY, record_method
from vleff.lightning.strategy import check_strategy, shards_parameters, whole_checkpoint
from vleff.lightning.targets import ModuleArg, RemovalOption, check_module_arg, refuse_other_settings, resolve_target
from vleff.registry import get_method
from vleff.side import selection as sel

#: the checkpoint entry holding the masks (:func:`vleff.side.selection.selection_state`)
CHECKPOINT_KEY = "vleff_selection"

LossFn = Callable[[pl.LightningModule, Any], torch.Tensor]


def trainable_only_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Drop the frozen parameters of every selected model from ``checkpoint["state_dict"]``."""
    frozen = sel.frozen_keys(pl_module)
    state = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {k: v for k, v in state.items() if k not in frozen}
    checkpoint[ADAPTERS_ONLY] = sorted(checkpoint["state_dict"])


def training_step_loss(pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The loss of ``pl_module.training_step(batch, 0)`` (a tensor or a dict's ``"loss"``), with
    the module's ``log`` / ``log_dict`` silenced: a Fisher pass is not a training step."""
    silenced = {name: pl_module.__dict__.get(name) for name in ("log", "log_dict")}
    pl_module.__dict__["log"] = lambda *args, **kwargs: None
    pl_module.__dict__["log_dict"] = lambda *args, **kwargs: None
    try:
        out = pl_module.training_step(batch, 0)
    finally:
        for name, value in silenced.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                pl_module.__dict__[name] = value
    loss = out["loss"] if isinstance(out, dict) else out
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise TypeError(
            "the Fisher selection needs a scalar loss: training_step returned "
            f"{type(out).__name__}; pass loss_fn=(module, batch) -> loss"
        )
    return loss


def start_training(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    target: nn.Module,
    method: str,
    select: Callable[[nn.Module, Iterable[Any], Callable[[Any], torch.Tensor]], None] | None,
    num_batches: int | None,
    loss_fn: LossFn | None,
) -> list[Any]:
    """What the callback and the mixin do at fit start: a pending Fisher selection is computed on
    the first ``num_batches`` training batches (``None``: all of them; streamed, one batch on the
    device at a time; rank 0's masks broadcast to every rank), then every optimizer gets the
    post-step hook (the masking itself is :func:`mask_before_step`'s). Returns the hook handles."""
    record = sel.record_of(target, method)
    if select is not None and record is not None and record["masks"] is None:
        loader = trainer.train_dataloader
        if loader is None:
            raise RuntimeError(f"{method}: the Fisher selection needs the training dataloader; there is none")
        batches: Iterable[Any] = itertools.islice(iter(loader), num_batches)
        sharded = trainer.world_size > 1 and shards_parameters(trainer.strategy)
        if sharded:  # every forward gathers from all ranks: all ranks run the pass, on rank 0's batches
            batches = _from_rank_zero(trainer, batches)
        fn = loss_fn
        loss = (lambda b: fn(pl_module, b)) if fn is not None else (lambda b: training_step_loss(pl_module, b))
        select(target, (trainer.strategy.batch_to_device(b) for b in batches), loss)
        if sharded:  # the Fisher pass's backward left gradients on the other trainable parameters
            pl_module.zero_grad(set_to_none=True)
        if trainer.world_size > 1:  # every rank trains rank 0's entries
            masks = trainer.strategy.broadcast(sel.masks_of(target, method), src=0)
            # every masked parameter keeps requiring grad (put back after each step instead): DDP's
            # reducer keeps the parameters it was built with, and a sharded checkpoint must hold
            # optimizer state for every parameter the resumed run's optimizer starts with
            sel.set_masks(target, method, masks, freeze_empty=False)
    handles: list[Any] = []
    for optimizer in trainer.optimizers:
        handles += sel.attach_masked_step(optimizer, target, mask=False)
    return handles


def _from_rank_zero(trainer: pl.Trainer, batches: Iterable[Any]) -> Iterator[Any]:
    """Rank 0's ``batches``, one at a time, on every rank (the others' own are not read); the end
    is a broadcast ``None``, so the ranks stop together whatever their loaders' lengths."""
    own = iter(batches) if trainer.is_global_zero else None
    while True:
        batch = next(own, None) if own is not None else None
        batch = trainer.strategy.broadcast(batch, src=0)
        if batch is None:
            return
        yield batch


def mask_before_step(target: nn.Module | None, method: str) -> None:
    """Mask ``target``'s gradients for the coming optimizer step (``on_before_optimizer_step`` of
    the callbacks and mixins): the fixed masks, or a fresh Bernoulli draw (the draw counter
    advances once per optimizer step). A pending Fisher selection raises."""
    if target is not None and sel.record_of(target, method) is not None:
        sel.mask_gradients(target, advance=True)


class SelectiveTuning(InitFromOption, RemovalOption, pl.Callback):
    """Base of the selective methods' callbacks (see the module docstring).

    Args: ``init_from`` (a checkpoint or ``state_dict`` of the trained model, loaded in ``setup``),
    ``module`` (the model to tune: attribute path or module object; default the one model holding
    a tower ``towers`` names), ``remove_on_teardown``, ``full_checkpoint`` (keep the frozen weights
    in checkpoints), ``loss_fn`` (``(module, batch) -> loss`` for a Fisher selection; default the
    module's ``training_step``), and the method's settings."""

    method: str = ""
    settings_config: type = type(None)

    def __init__(
        self,
        init_from: str | None = None,
        module: ModuleArg = None,
        remove_on_teardown: bool = False,
        full_checkpoint: bool = False,
        loss_fn: LossFn | None = None,
        **settings: Any,
    ) -> None:
        self.init_removal(remove_on_teardown)
        super().__init__()
        self.config = self.settings_config.build(**settings)  # bad values fail here, naming the setting
        self.full_checkpoint = check_bool("full_checkpoint", full_checkpoint)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn={loss_fn!r}: pass a callable (module, batch) -> scalar loss, or None")
        self.loss_fn = loss_fn
        self.init_initial(init_from)
        self.module = check_module_arg(module)
        self._target: Any = None
        self._handles: list[Any] = []

    # --- what a Fisher-selecting subclass provides ---------------------------------------------------
    def fisher_batches(self) -> int | None:
        """How many training batches the Fisher selection reads (0: the method needs none;
        ``None``: the whole training dataloader)."""
        return 0

    def fisher_select(self, target: nn.Module, batches: Iterable[Any], loss: Callable[[Any], torch.Tensor]) -> None:
        """Compute and store the masks of ``target`` from ``batches`` (subclasses with Fisher)."""

    # --- Lightning hooks ------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, self.method)
        entry = get_method(self.method)
        target = self._target = resolve_target(pl_module, self.module, self.method, self.config)
        self.note_removal(target)
        if entry.is_applied(target):
            refuse_other_settings(self.method, target, self.config)
        else:
            self.load_initial_once(pl_module, target, stage)
            self.apply_removable(target, lambda: entry.apply(target, self.config))
        if not self.full_checkpoint:
            pl_module.strict_loading = False  # the frozen keys are not in a trainable-only checkpoint

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()
        select = self.fisher_select if self.fisher_batches() != 0 else None
        self._handles = start_training(
            trainer, pl_module, self._target, self.method, select, self.fisher_batches(), self.loss_fn
        )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        mask_before_step(self._target, self.method)

    def _detach(self) -> None:
        sel.detach_masked_step(self._handles)
        self._handles = []

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self.remove_at_teardown(self._target)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not (self.full_checkpoint or whole_checkpoint(trainer)):
            trainable_only_checkpoint(pl_module, checkpoint)
        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, self.method, self.config)
            state = sel.selection_state(self._target)
            if state is not None:
                checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if CHECKPOINT_KEY in checkpoint and self._target is not None:  # the masks first: they settle what trains
            sel.load_selection_state(self._target, checkpoint[CHECKPOINT_KEY])
        if ADAPTERS_ONLY in checkpoint:
            have = set(checkpoint.get("state_dict", {}))
            frozen = sel.frozen_keys(pl_module)
            missing = sorted(k for k in pl_module.state_dict() if k not in frozen and k not in have)
            if missing:
                raise KeyError(
                    f"the trainable-only checkpoint lacks keys {missing[:5]} (what trains under {self.method}); "
                    "resume with the method and settings it was trained with"
                )

    def state_dict(self) -> dict[str, Any]:
        return self.config.as_dict()


class SelectiveMixin:
    """Shared by the selective methods' mixins: ``_use_selection(method, config, module, select,
    num_batches)`` applies the method in ``__init__``; at fit start a pending Fisher selection is
    computed and every optimizer gets the masked step (as the callback does); the masks and
    Child-Tuning_F's draw counter travel in checkpoints. Checkpoints keep the whole model."""

    _vleff_selective_use: tuple[str, nn.Module, Any, int | None] | None = None
    _vleff_selective_handles: list[Any] | None = None

    def _use_selection(
        self, method: str, config: Any, module: Any = None, select: Any = None, num_batches: int | None = 0
    ) -> None:
        from vleff.lightning.mixin import mixin_target

        target = mixin_target(self, module, method, config)
        entry = get_method(method)
        assert entry.apply is not None
        entry.apply(target, config)
        self.__dict__["_vleff_selective_use"] = (method, target, select, num_batches)

    def on_train_start(self) -> None:
        next_hook(self, SelectiveMixin, "on_train_start")
        if self._vleff_selective_use is not None:
            method, target, select, num_batches = self._vleff_selective_use
            sel.detach_masked_step(self._vleff_selective_handles or [])
            handles = start_training(self.trainer, self, target, method, select, num_batches, None)  # type: ignore[attr-defined,arg-type]
            self.__dict__["_vleff_selective_handles"] = handles

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        next_hook(self, SelectiveMixin, "on_before_optimizer_step", optimizer)
        if self._vleff_selective_use is not None:
            mask_before_step(self._vleff_selective_use[1], self._vleff_selective_use[0])

    def on_train_end(self) -> None:
        next_hook(self, SelectiveMixin, "on_train_end")
        sel.detach_masked_step(self._vleff_selective_handles or [])
        self.__dict__["_vleff_selective_handles"] = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, SelectiveMixin, "on_save_checkpoint", checkpoint)
        if self._vleff_selective_use is not None:
            state = sel.selection_state(self._vleff_selective_use[1])
            if state is not None:
                checkpoint[CHECKPOINT_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, SelectiveMixin, "on_load_checkpoint", checkpoint)
        if self._vleff_selective_use is not None and CHECKPOINT_KEY in checkpoint:
            sel.load_selection_state(self._vleff_selective_use[1], checkpoint[CHECKPOINT_KEY])


__all__ = [
    "CHECKPOINT_KEY",
    "SelectiveMixin",
    "mask_before_step",
    "SelectiveTuning",
    "start_training",
    "trainable_only_checkpoint",
    "training_step_loss",
]
