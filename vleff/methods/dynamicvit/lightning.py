"""Lightning callback: fine-tune with DynamicViT token pruning, the user's code unchanged.

``setup`` performs the surgery (:func:`vleff.methods.dynamicvit.core.apply_dynamicvit`) on the
backbone inside the LightningModule before ``configure_optimizers`` runs (so the predictors
are in ``self.parameters()`` and reach the optimizer) and before checkpoint weights are
restored (so resuming restores the predictors). The keep-ratio and distillation losses are
added to the loss the user's ``training_step`` returns (:mod:`vleff.lightning.aux_loss`).

The teacher (a frozen copy of the backbone made at setup) is not part of the module's
``state_dict``; it is saved in this callback's state so that a resumed run distils from the
same teacher even when the module's ``__init__`` does not load the same weights again.
Gradient clipping (``Trainer(gradient_clip_val=...)``) is advised for low keep ratios.

DynamicViT fine-tunes a *trained* model (the teacher is that model). If the module does not
load trained weights itself, pass ``init_from=<checkpoint>``: the weights are loaded in
``setup`` before the surgery (see :mod:`vleff.lightning.init_weights`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from vleff.checks import check_bool
from vleff.lightning.aux_loss import AuxLoss
from vleff.lightning.budget import BudgetOption
from vleff.lightning.init_weights import InitFromOption
from vleff.lightning.mixin import AuxLossMixin, next_hook
from vleff.lightning.targets import (
    ModuleArg,
    RemovalOption,
    check_module_arg,
    refuse_other_settings,
    resolve_backbone,
)
from vleff.methods.dynamicvit.core import (
    DISTILLER_ATTR,
    DynamicViTConfig,
    apply_dynamicvit,
    dynamicvit_teacher,
)


class DynamicViT(InitFromOption, RemovalOption, BudgetOption, AuxLoss):
    """DynamicViT (learned token pruning) for an existing LightningModule.

    Args:
        module: the backbone in the LightningModule, as a dotted attribute path or the module
            object (default: its one child holding an image tower; several are refused).
        save_teacher: store the teacher's weights in the checkpoint (exact resume).
        log: log the aux losses as ``train/aux/dynamicvit/*``.
        init_from: a Lightning checkpoint or ``state_dict`` file loaded into the module (or
            its backbone) at the start of the first ``fit``, before the surgery: fine-tune a
            trained model, which then is also the teacher. Not a resume (fresh optimizer).
        flops_target: set the method's knob at the start of ``fit`` so the measured FLOPs are this
            fraction of the model without the method (:func:`vleff.fit_budget` on the first
            ``budget_batches`` training batches; kept in checkpoints).
        budget_tower: ``"image"`` or ``"text"``: ``flops_target`` is of that tower of an image-text
            model alone (:func:`vleff.budget.tower_forward`); ``None``: of the whole model.
        **settings: :class:`vleff.methods.dynamicvit.core.DynamicViTConfig` fields (``rho``,
            ``locations``, ``keep_ratios``, ``distill``, the loss weights ...), validated here.
    """

    #: the method config whose fields ``**settings`` takes (Hydra config checks read it)
    settings_config = DynamicViTConfig
    method = "dynamicvit"

    def __init__(
        self,
        module: ModuleArg = None,
        save_teacher: bool = True,
        log: bool = True,
        init_from: str | None = None,
        remove_on_teardown: bool = False,
        flops_target: float | None = None,
        budget_batches: int = 4,
        budget_tower: str | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(log)
        self.init_removal(remove_on_teardown)
        self.init_budget(flops_target, budget_batches, budget_tower)
        self.config = DynamicViTConfig.build(**settings)
        self.module = check_module_arg(module)
        self.save_teacher = check_bool("save_teacher", save_teacher)
        self.init_initial(init_from)
        self._target: nn.Module | None = None
        self._pending_teacher: dict[str, Any] | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.config.as_dict()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        target = resolve_backbone(pl_module, self.module, "dynamicvit")
        self.load_initial_once(pl_module, target, stage)  # before the teacher is copied
        self.note_removal(target)
        self.apply_or_keep(target, self.config, lambda: apply_dynamicvit(target, self.config))
        self._target = target
        if self._pending_teacher is not None:
            self._load_teacher(self._pending_teacher)
        super().setup(trainer, pl_module, stage)  # the distillation / ratio losses join the training loss

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # the loss wrapper released
        self.remove_at_teardown(self._target)

    # --- checkpoint state ----------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        from vleff.lightning.restore import record_method

        if self._target is not None:
            record_method(checkpoint, pl_module, self._target, "dynamicvit", self.config)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_budget_at_train_start(trainer, self._target if self._target is not None else pl_module)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "kwargs": {k: v for k, v in self.kwargs.items() if k != "logits_fn"},
            "budget": self.budget_state(),
        }
        teacher = dynamicvit_teacher(self._target) if self._target is not None else None
        if self.save_teacher and teacher is not None:
            state["teacher"] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("kwargs", {})
        self.load_budget_state(state_dict.get("budget", {}))
        for key in ("rho", "locations", "keep_ratios"):
            if key in saved and saved[key] != self.kwargs[key]:
                raise ValueError(
                    f"checkpoint was trained with DynamicViT {key}={saved[key]!r} but this callback "
                    f"has {key}={self.kwargs[key]!r}; the predictors would not match"
                )
        if "teacher" in state_dict:
            if self._target is not None and DISTILLER_ATTR in self._target.__dict__:
                self._load_teacher(state_dict["teacher"])
            else:
                self._pending_teacher = state_dict["teacher"]

    def _load_teacher(self, weights: dict[str, Any]) -> None:
        teacher = dynamicvit_teacher(self._target) if self._target is not None else None
        if teacher is not None:
            teacher.load_state_dict(weights)
        self._pending_teacher = None


# --- the mixin: the same behaviour for users who own the LightningModule ---------------------------
TEACHER_KEY = "vleff_dynamicvit_teacher"


class DynamicViTMixin(AuxLossMixin):
    """``use_dynamicvit(backbone, **settings)`` + ``vleff_aux_loss()`` in ``training_step``; the
    teacher's weights travel in the checkpoint under ``"vleff_dynamicvit_teacher"`` (not in the
    ``state_dict``)."""

    _vleff_dynamicvit_backbone: nn.Module | None = None

    def use_dynamicvit(self, module: Any = None, **settings: Any) -> None:
        """Apply DynamicViT to the classifier this module holds (a child whose forward gives logits):
        ``module=`` names it (attribute path or the module object, also positionally:
        ``self.use_dynamicvit(self.net, rho=0.7)``) when the module holds several models, as every
        mixin's ``module=``."""
        config = DynamicViTConfig.build(**settings)
        backbone = resolve_backbone(self, check_module_arg(module), "dynamicvit")  # as the callback picks it
        refuse_other_settings("dynamicvit", backbone, config)
        apply_dynamicvit(backbone, config)
        self.__dict__["_vleff_dynamicvit_backbone"] = backbone

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, DynamicViTMixin, "on_save_checkpoint", checkpoint)
        teacher = dynamicvit_teacher(self._vleff_dynamicvit_backbone) if self._vleff_dynamicvit_backbone else None
        if teacher is not None:
            checkpoint[TEACHER_KEY] = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        next_hook(self, DynamicViTMixin, "on_load_checkpoint", checkpoint)
        teacher = dynamicvit_teacher(self._vleff_dynamicvit_backbone) if self._vleff_dynamicvit_backbone else None
        if teacher is not None and TEACHER_KEY in checkpoint:
            teacher.load_state_dict(checkpoint[TEACHER_KEY])
