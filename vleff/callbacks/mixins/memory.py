"""Mixins of the memory methods: GaLore (the module builds its own optimizer), MeZO (opted into in
code) and reversible blocks.

>>> class MyModule(GaLoreMixin, L.LightningModule):
...     def configure_optimizers(self):
...         return self.galore_optimizer(lr=1e-4, weight_decay=0.05, rank=128)

>>> class MyModule(MeZOMixin, L.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.use_mezo(eps=1e-3, lr=1e-6)     # training_step stays as it is
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from vleff.methods.galore.core import DEFAULT_SVD, GaLoreAdamW
from vleff.methods.reversible.core import ReversibleConfig, apply_reversible
from vleff.methods.galore.selection import DEFAULT_EXCLUDE, galore_param_groups

__all__ = ["GaLoreMixin", "MeZOMixin", "ReversibleMixin"]


class GaLoreMixin:
    """Adds :meth:`galore_optimizer` (projected 2-D weights + plain AdamW for the rest)."""

    def galore_optimizer(self, lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                         eps: float = 1e-8, *, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                         proj_type: str = "std", targets: str | Sequence[str] | None = None,
                         exclude: str | Sequence[str] | None = DEFAULT_EXCLUDE,
                         svd: str = DEFAULT_SVD) -> GaLoreAdamW:
        """A :class:`GaLoreAdamW` over this module: 2-D weights chosen by ``targets``/``exclude``
        projected with ``rank`` (refreshed by a ``svd`` SVD every ``update_proj_gap`` steps)."""
        if not isinstance(self, nn.Module):
            raise TypeError("GaLoreMixin must be mixed into an nn.Module (a LightningModule)")
        groups = galore_param_groups(self, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                     proj_type=proj_type, targets=targets, exclude=exclude, svd=svd)
        return GaLoreAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class MeZOMixin:
    """Turns the module's own ``training_step`` into MeZO steps at fit start.

    Call ``self.use_mezo(**settings)`` in ``__init__`` (the fields of
:class:`vleff.methods.mezo.MeZOConfig`, validated there, as for :class:`vleff.callbacks.MeZO`). Same
    implementation as the callback (:func:`vleff.callbacks.mezo.install_mezo`), so the same
    hook and logging behaviour (see :mod:`vleff.callbacks.mezo`): ``training_step`` runs twice
    per step, ``on_before_optimizer_step`` fires once at the restored weights, and what the step
    logs is logged once (the mean of the two evaluations for floating values). At fit end the
    module's own ``training_step`` and ``automatic_optimization`` come back (a later fit of the
    module without the mixin's MeZO trains with backprop); the GaLore callback refuses it.
    """

    _vleff_mezo_config: Any = None

    def use_mezo(self, **settings: Any) -> None:
        from vleff.methods.mezo import MeZOConfig

        self._vleff_mezo_config = MeZOConfig.build(**settings)

    def on_fit_start(self) -> None:
        from vleff.callbacks.mezo import install_mezo

        super_hook = getattr(super(), "on_fit_start", None)
        if super_hook is not None:
            super_hook()
        if self._vleff_mezo_config is None:
            raise RuntimeError(f"{type(self).__name__} mixes in MeZOMixin but never called self.use_mezo(...) in "
                               "__init__; call it (e.g. self.use_mezo(eps=1e-3, lr=1e-6)) or drop the mixin")
        install_mezo(self.trainer, self, self._vleff_mezo_config)  # type: ignore[attr-defined, arg-type]

    def on_train_epoch_end(self) -> None:
        from vleff.callbacks.schedulers import step_lr_schedulers

        super_hook = getattr(super(), "on_train_epoch_end", None)
        if super_hook is not None:
            super_hook()
        step_lr_schedulers(self.trainer, "epoch")  # type: ignore[attr-defined]

    def on_fit_end(self) -> None:
        from vleff.callbacks.mezo import uninstall_mezo

        super_hook = getattr(super(), "on_fit_end", None)
        if super_hook is not None:
            super_hook()
        uninstall_mezo(self, self.trainer)  # type: ignore[arg-type, attr-defined]


class ReversibleMixin:
    """``use_reversible(**settings)``: run the module's towers as reversible stacks (call it
    in ``__init__`` once the backbone exists, so ``load_from_checkpoint`` rebuilds the same
    network the weights were trained in). Settings: :class:`vleff.methods.reversible.core.ReversibleConfig`."""

    def use_reversible(self, module: Any = None, **settings: Any) -> None:
        """``module``: the model to make reversible when the module holds several (attribute
        path or module object; :mod:`vleff.callbacks.targets`), else refused listing them."""
        from vleff.callbacks.targets import check_module_arg, resolve_target

        config = ReversibleConfig.build(**settings)
        apply_reversible(resolve_target(self, check_module_arg(module), "reversible", config), config)
