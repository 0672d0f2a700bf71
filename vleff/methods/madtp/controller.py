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

from typing import Any, Iterable

import torch
from torch import nn

from vleff.checks import check_bool, check_choice, check_int, check_number
from vleff.tokens.common import hooks_named
from vleff.methods.madtp.core import (FORWARDS, HOOK_NAME, MADTPCalibration, MADTPConfig, _pair_and_module, batch_inputs,
                               calibrate_madtp, update_madtp)


def hooks_config(model: nn.Module) -> MADTPConfig:
    """The config of the MADTP applied to ``model``."""
    pair, _ = _pair_and_module(model)
    return hooks_named(pair.model, HOOK_NAME)[0].config


class MADTPController:
    """τ for a FLOPs target, before training and after each epoch.

    Args:
        num_batches: training batches kept for calibration (their batch size sets the cost
            that is measured, as in training).
        adjust_every_epoch: re-calibrate after every training epoch.
        rtol: relative FLOPs tolerance of the search.
        max_evals, epoch_max_evals: forwards per calibration (first / per-epoch).
        measure: what the FLOPs target is of: ``"pair"`` (both towers, BLIP's matching path),
            ``"image"`` or ``"text"`` (one tower alone).
        samples: measure the first ``samples`` calibration samples one at a time (batch 1;
            ``None``: the batches as given, whose cost is their maximum keep count).
        flops_reduction: the target (``None``: the applied MADTP's ``flops_reduction``, read at
            the first calibration).
        warmup_epochs: epochs over which the trained reduction ramps up to the target (see
            the module docstring); needs ``adjust_every_epoch``.
    """

    def __init__(self, num_batches: int = 2, adjust_every_epoch: bool = True, rtol: float = 0.005,
                 max_evals: int = 40, epoch_max_evals: int = 12, measure: str = "pair",
                 samples: int | None = None, flops_reduction: float | None = None, warmup_epochs: int = 0) -> None:
        self.num_batches = check_int("calibration_batches", num_batches, low=1)
        self.adjust_every_epoch = check_bool("adjust_every_epoch", adjust_every_epoch)
        self.rtol = check_number("rtol", rtol, low=0, low_open=True)
        self.max_evals = check_int("max_evals", max_evals, low=2)
        self.epoch_max_evals = check_int("epoch_max_evals", epoch_max_evals, low=2)
        self.measure = check_choice("measure", measure, tuple(FORWARDS))
        self.samples = None if samples is None else check_int("samples", samples, low=1)
        self.flops_reduction = None if flops_reduction is None else check_number(
            "flops_reduction", flops_reduction, low=0, high=1, low_open=True, high_open=True, owner="MADTP")
        self.warmup_epochs = check_int("warmup_epochs", warmup_epochs, low=0)
        if self.warmup_epochs and not self.adjust_every_epoch:
            raise ValueError(f"warmup_epochs={warmup_epochs} needs adjust_every_epoch=True (the ramp moves the "
                             f"target once per epoch); set warmup_epochs=0 or adjust_every_epoch=True")
        self.batches: list[tuple[torch.Tensor, ...]] | None = None
        self.baseline: int | None = None
        self.tau: float | None = None
        self.history: list[dict[str, Any]] = []

    @property
    def calibrated(self) -> bool:
        return self.tau is not None

    def capture(self, loader: Iterable[Any]) -> None:
        """Keep the first ``num_batches`` batches of ``loader`` (images, ids, mask on the CPU)."""
        batches = []
        for batch in loader:
            images, ids, mask = batch_inputs(batch)
            batches.append(tuple(t.detach().cpu() for t in (images, ids, mask) if t is not None))
            if len(batches) == self.num_batches:
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
        result = calibrate_madtp(model, self.batches, reduction, rtol=self.rtol, baseline=self.baseline,
                                 forward=FORWARDS[self.measure], samples=self.samples,
                                 max_evals=self.max_evals if epoch is None else self.epoch_max_evals)
        self.baseline, self.tau = result.baseline, result.tau
        self.history.append({"epoch": epoch, "flops_reduction": reduction, "tau": result.tau, "start": result.start,
                             "ratio": result.ratio, "evaluations": len(result.evaluations), "final": final})
        return result

    def finish(self, model: nn.Module) -> MADTPCalibration | None:
        """At the end of training: re-calibrate at the full target if the last calibration was
        for a warm-up epoch (a run shorter than the ramp); ``None`` when it already was."""
        if not self.history or self.flops_reduction is None or self.history[-1].get("flops_reduction") == self.flops_reduction:
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
            self.tau = float(self.history[-1]["tau"])
        self.restore(model)

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "baseline": self.baseline, "history": list(self.history),
                "batches": self.batches, "target": self.flops_reduction, "warmup_epochs": self.warmup_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = None if state.get("tau") is None else float(state["tau"])
        self.baseline = state.get("baseline")
        self.history = list(state.get("history", []))
        target = state.get("target")
        if target is not None and self.flops_reduction is not None and float(target) != self.flops_reduction:
            raise ValueError(f"checkpoint was calibrated for MADTP flops_reduction={target!r} but this controller has "
                             f"flops_reduction={self.flops_reduction!r}")
        if target is not None:
            self.flops_reduction = float(target)
        saved = state.get("warmup_epochs", 0)
        if saved != self.warmup_epochs:
            raise ValueError(f"checkpoint was trained with MADTP warmup_epochs={saved} but this controller has "
                             f"warmup_epochs={self.warmup_epochs}; resume with the same ramp")
        batches = state.get("batches")
        self.batches = None if batches is None else [tuple(t for t in b) for b in batches]
