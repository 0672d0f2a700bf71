"""Add vleff's auxiliary losses to a LightningModule's loss without editing ``training_step``.

:func:`attach_aux_loss` wraps the module's ``training_step`` (an instance attribute, so the
class is untouched and :func:`detach_aux_loss` restores it exactly): after the user's step
returns its loss, the pending aux losses of the module's towers are popped
(:func:`vleff.tokens.aux.pop_aux_losses`), added to the loss and logged as
``train/aux/<name>``. Users who prefer to own the sum call ``self.vleff_aux_loss()``
(:class:`vleff.callbacks.mixins.AuxLossMixin`) in their step; because losses are popped, the wrapper
then finds nothing left and adds nothing, so both paths can coexist.

Several callbacks may attach (DynamicViT, CrossGET, MADTP): the wrapper is installed once
and reference-counted. Wrapping happens in ``setup``, which Lightning calls before the
strategy wraps the module (DDP) and before it first looks the step up.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from vleff.checks import check_bool
from vleff.tokens.aux import add_to_step_output, pop_aux_losses

_WRAP_ATTR = "_vleff_aux_wrap"


class _StepWrapper:
    """The replacement ``training_step``: the user's step plus the pending aux losses."""

    def __init__(self, module: pl.LightningModule, log: bool) -> None:
        self.module = module
        self.original = module.__dict__.get("training_step")  # an earlier instance override, if any
        # what Lightning's ``is_overridden`` inspects (it follows ``__wrapped__`` to a ``__code__``)
        self.__wrapped__ = self.original if self.original is not None else type(module).training_step.__get__(module)
        self.users = 0
        self.log = log
        self._warned_manual = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        output = self.__wrapped__(*args, **kwargs)
        losses = pop_aux_losses(self.module)
        if not losses:
            return output
        if not self.module.automatic_optimization:
            if not self._warned_manual:
                warnings.warn(
                    "manual optimization: vleff cannot add its aux losses to your loss; add "
                    "self.vleff_aux_loss() (AuxLossMixin) before manual_backward",
                    stacklevel=2,
                )
                self._warned_manual = True
            return output
        total = sum(v.float().reshape(()) for v in losses.values())
        if self.log and self.module._trainer is not None:
            batch_size = _batch_size(args[0]) if args else None
            self.module.log_dict(
                {f"train/aux/{k}": v.detach().float() for k, v in losses.items()},
                on_step=True,
                on_epoch=False,
                batch_size=batch_size,
            )
        return add_to_step_output(output, total)


def _batch_size(batch: Any) -> int | None:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].shape[0]
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value.shape[0]
    return None


def attach_aux_loss(pl_module: pl.LightningModule, log: bool = True) -> None:
    """Make ``pl_module``'s training loss include vleff's aux losses (idempotent, ref-counted)."""
    wrapper = pl_module.__dict__.get(_WRAP_ATTR)
    if wrapper is None:
        wrapper = _StepWrapper(pl_module, log)
        pl_module.__dict__[_WRAP_ATTR] = wrapper
        pl_module.__dict__["training_step"] = wrapper
    wrapper.users += 1


def detach_aux_loss(pl_module: pl.LightningModule) -> None:
    """Release one :func:`attach_aux_loss`; the last release restores the original step."""
    wrapper = pl_module.__dict__.get(_WRAP_ATTR)
    if wrapper is None:
        return
    wrapper.users -= 1
    if wrapper.users <= 0:
        del pl_module.__dict__[_WRAP_ATTR]
        if wrapper.original is not None:
            pl_module.__dict__["training_step"] = wrapper.original
        else:
            pl_module.__dict__.pop("training_step", None)


def aux_loss_attached(pl_module: pl.LightningModule) -> bool:
    return _WRAP_ATTR in pl_module.__dict__


class AuxLoss(Callback):
    """Adds the aux losses of methods applied with the functional API (``vleff.apply_*``) to
    the training loss. The method callbacks with aux losses (:class:`vleff.callbacks.DynamicViT`,
    ``CrossGET``, ``MADTP``) subclass it: their ``setup`` applies the method, then calls this
    one's; use this callback itself when you applied the method in your module's ``__init__``.

    The step wrapper is attached for ``fit`` only and released, on the module it was attached
    to, at ``teardown``."""

    def __init__(self, log: bool = True) -> None:
        self.log = check_bool("log", log)
        self._attached: pl.LightningModule | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._attached is None:
            attach_aux_loss(pl_module, self.log)
            self._attached = pl_module

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._attached is not None:
            detach_aux_loss(self._attached)
            self._attached = None
