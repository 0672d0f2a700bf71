"""MADTP's FLOPs controller for training loops: τ calibrated before training, re-calibrated after
every epoch, its state (τ, baseline, calibration batches, history) saved for exact resume.

Shared by :class:`vleff.callbacks.MADTP` and :class:`vleff.callbacks.MADTPMixin`; it knows no
Lightning (a loader is anything iterable, the model any module :func:`apply_madtp` accepts).

Why re-calibrate per epoch: training changes the attention and the codebook, so the same τ
prunes differently. The reference moves τ by fixed steps (±1 … ±0.01) by the size of the gap
after each epoch; here the same search :func:`calibrate_madtp` uses runs again from the current
τ on the stored calibration batches (few forwards: the bracket starts at the current value),
so the measured FLOPs stay at the target rather than drifting towards it.

Why a warm-up (``warmup_epochs``, default 0 = the target from the first step): the reference
reaches its target gradually, because its τ starts at 1 and moves by at most one step per
epoch, so its model meets the full pruning only after a few epochs. Calibrating to the target
before the first step (vleff's default) asks the pretrained attention to cope with all of the
pruning at once. With ``warmup_epochs=W`` the reduction trained at in epoch ``e`` (0-based) is
``flops_reduction × min(1, (e + 1) / (W + 1))``: a linear ramp that reaches the target at epoch
``W`` and stays there; the model is re-calibrated at the target when training ends, whatever
the run's length.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from vleff.checks import check_bool, check_choice, check_int, check_number
from vleff.methods.madtp.core import (
    FORWARDS,
    HOOK_NAME,
    MADTPCalibration,
    MADTPConfig,
    _pair_and_module,
    batch_inputs,
    calibrate_madtp,
    check_flops_reduction,
    update_madtp,
)
from vleff.tokens.common import hooks_named


def hooks_config(model: nn.Module) -> MADTPConfig:
    """The config of the MADTP applied to ``model``."""
    pair, _ = _pair_and_module(model)
    return hooks_named(pair.model, HOOK_NAME)[0].config


@dataclass(frozen=True)
class ControllerConfig:
    """The FLOPs controller's settings, validated here once (the callback, the mixin and the
    Hydra config take these names; :meth:`split` sorts them out of a callback's keywords).

    Args:
        calibration_batches: training batches kept for calibration (their batch size sets the
            cost of each counted forward).
        adjust_every_epoch: re-calibrate after every training epoch.
        rtol: relative FLOPs tolerance of the search.
        max_evals, epoch_max_evals: counted forwards per calibration (first / per-epoch).
        measure: the FLOPs the target is of: ``"pair"`` (both towers), ``"image"`` or ``"text"``.
        samples: measure the first ``samples`` calibration samples one at a time (batch 1;
            per-sample cost; ``None``: the batches as given, which cost their maximum keep count).
        warmup_epochs: epochs over which the trained reduction ramps up to the target (see
            the module docstring); needs ``adjust_every_epoch``.
    """

    calibration_batches: int = 2
    adjust_every_epoch: bool = True
    rtol: float = 0.005
    max_evals: int = 40
    epoch_max_evals: int = 12
    measure: str = "pair"
    samples: int | None = None
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "calibration_batches", check_int("calibration_batches", self.calibration_batches, low=1))
        put(self, "adjust_every_epoch", check_bool("adjust_every_epoch", self.adjust_every_epoch))
        put(self, "rtol", check_number("rtol", self.rtol, low=0, low_open=True))
        put(self, "max_evals", check_int("max_evals", self.max_evals, low=2))
        put(self, "epoch_max_evals", check_int("epoch_max_evals", self.epoch_max_evals, low=2))
        put(self, "measure", check_choice("measure", self.measure, tuple(FORWARDS)))
        put(self, "samples", None if self.samples is None else check_int("samples", self.samples, low=1))
        put(self, "warmup_epochs", check_int("warmup_epochs", self.warmup_epochs, low=0))
        if self.warmup_epochs and not self.adjust_every_epoch:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} needs adjust_every_epoch=True (the ramp moves the "
                f"target once per epoch); set warmup_epochs=0 or adjust_every_epoch=True"
            )

    @classmethod
    def split(cls, settings: dict[str, Any]) -> tuple[ControllerConfig, dict[str, Any]]:
        """This config from the controller's names in ``settings``, and the other settings (the
        method's own, for :class:`MADTPConfig`)."""
        names = {f.name for f in fields(cls)}
        return (
            cls(**{k: v for k, v in settings.items() if k in names}),
            {k: v for k, v in settings.items() if k not in names},
        )

    def replace(self, **changes: Any) -> ControllerConfig:
        return replace(self, **changes)


class MADTPController:
    """Calibrates MADTP's τ before training and after each epoch, and saves what it needs to
    resume exactly.

    Args:
        config: the controller's settings (:class:`ControllerConfig`); ``settings`` (its field
            names) build it instead.
        flops_reduction: the target (``None``: the applied MADTP's ``flops_reduction``, read at
            the first calibration); validated by :func:`check_flops_reduction`, the one rule.
    """

    def __init__(
        self, config: ControllerConfig | None = None, flops_reduction: float | None = None, **settings: Any
    ) -> None:
        if config is not None and settings:
            raise TypeError(f"MADTPController takes a config or its settings, not both (got {sorted(settings)})")
        self.config = config if config is not None else ControllerConfig(**settings)
        self.flops_reduction = None if flops_reduction is None else check_flops_reduction(flops_reduction)
        self.batches: list[tuple[torch.Tensor, ...]] | None = None
        self.baseline: int | None = None
        self.history: list[dict[str, Any]] = []

    @property
    def tau(self) -> float | None:
        """The τ of the last calibration (the history is its one owner); ``None`` before the first."""
        return float(self.history[-1]["tau"]) if self.history else None

    @property
    def calibrated(self) -> bool:
        return bool(self.history)

    @property
    def warmup_epochs(self) -> int:
        return self.config.warmup_epochs

    def capture(self, loader: Iterable[Any]) -> None:
        """Keep the first ``calibration_batches`` batches of ``loader`` (images, ids, mask on the CPU)."""
        batches = []
        for batch in loader:
            images, ids, mask = batch_inputs(batch)
            batches.append(tuple(t.detach().cpu() for t in (images, ids, mask) if t is not None))
            if len(batches) == self.config.calibration_batches:
                break
        if not batches:
            raise ValueError("MADTP calibration: the training loader gave no batch")
        self.batches = batches

    def reduction_for(self, epoch: int) -> float:
        """The FLOPs reduction trained at in ``epoch`` (0-based): the warm-up ramp, then the target."""
        if self.flops_reduction is None:
            raise RuntimeError("the MADTP controller does not know its target yet; calibrate once first")
        return self.flops_reduction * min(1.0, (epoch + 1) / (self.warmup_epochs + 1))

    def calibrate(self, model: nn.Module, epoch: int | None = None, final: bool = False) -> MADTPCalibration:
        """Search τ on the stored batches for the epoch that follows: before training (``epoch``
        ``None``), after epoch ``epoch`` (from the current τ), or at the full target (``final``)."""
        if self.batches is None:
            raise RuntimeError("MADTP calibration has no batches; call capture(loader) first")
        if self.flops_reduction is None:
            self.flops_reduction = hooks_config(model).flops_reduction
        reduction = self.flops_reduction if final else self.reduction_for(0 if epoch is None else epoch + 1)
        c = self.config
        result = calibrate_madtp(
            model,
            self.batches,
            reduction,
            rtol=c.rtol,
            baseline=self.baseline,
            forward=FORWARDS[c.measure],
            samples=c.samples,
            max_evals=c.max_evals if epoch is None else c.epoch_max_evals,
        )
        self.baseline = result.baseline
        self.history.append(
            {
                "epoch": epoch,
                "flops_reduction": reduction,
                "tau": result.tau,
                "start": result.start,
                "ratio": result.ratio,
                "evaluations": len(result.evaluations),
                "final": final,
            }
        )
        return result

    def finish(self, model: nn.Module) -> MADTPCalibration | None:
        """At the end of training: re-calibrate at the full target if the last calibration was
        for a warm-up epoch (a run shorter than the ramp); ``None`` when it already was."""
        if (
            not self.history
            or self.flops_reduction is None
            or self.history[-1].get("flops_reduction") == self.flops_reduction
        ):
            return None
        return self.calibrate(model, epoch=self.history[-1]["epoch"], final=True)

    def restore(self, model: nn.Module) -> None:
        """Put the stored τ (and the first pruning block and the reduction it was calibrated
        for) on ``model``: after a checkpoint was loaded, or a state from another rank."""
        if self.tau is None:
            return
        last = self.history[-1] if self.history else {}
        changes: dict[str, Any] = {"tau": self.tau}
        if "flops_reduction" in last:
            changes["flops_reduction"] = last["flops_reduction"]
        update_madtp(model, **changes)
        if "start" in last:
            _pair_and_module(model)[1].start = int(last["start"])

    def resume(self, model: nn.Module) -> None:
        """Continue training from a checkpoint: a checkpoint written after :meth:`finish` moved τ
        to the full target ends a warm-up early, so that calibration is undone (the run goes on
        with the τ of its epoch, exactly as if it had not stopped)."""
        if len(self.history) > 1 and self.history[-1].get("final"):
            self.history.pop()
        self.restore(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tau": self.tau,
            "baseline": self.baseline,
            "history": list(self.history),
            "batches": self.batches,
            "target": self.flops_reduction,
            "warmup_epochs": self.warmup_epochs,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline = state.get("baseline")
        self.history = list(state.get("history", []))
        target = state.get("target")
        if target is not None and self.flops_reduction is not None and float(target) != self.flops_reduction:
            raise ValueError(
                f"checkpoint was calibrated for MADTP flops_reduction={target!r} but this controller has "
                f"flops_reduction={self.flops_reduction!r}"
            )
        if target is not None:
            self.flops_reduction = float(target)
        saved = state.get("warmup_epochs", 0)
        if saved != self.warmup_epochs:
            raise ValueError(
                f"checkpoint was trained with MADTP warmup_epochs={saved} but this controller has "
                f"warmup_epochs={self.warmup_epochs}; resume with the same ramp"
            )
        if state.get("tau") is not None and not self.history:
            raise ValueError(
                "MADTP controller state has a τ but no calibration history; it was not written by "
                "MADTPController.state_dict"
            )
        batches = state.get("batches")
        self.batches = None if batches is None else [tuple(t for t in b) for b in batches]
