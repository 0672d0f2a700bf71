"""MADTP's FLOPs controller for training loops: τ calibrated before training, re-calibrated after
every epoch, its state (τ, baseline, calibration batches, history) saved for exact resume.

Shared by :class:`vleff.callbacks.MADTP` and :class:`vleff.callbacks.MADTPMixin`; it knows no
Lightning (a loader is anything iterable, the model any module :func:`apply_madtp` accepts).

Why re-calibrate per epoch: training changes the attention and the codebook, so the same τ
prunes differently. The reference moves τ by fixed steps (±1 … ±0.01) by the size of the gap
after each epoch; here the same search :func:`calibrate_madtp` uses runs again from the current
τ on the stored calibration batches (few forwards: the bracket starts at the current value),
so the measured FLOPs stay at the target rather than drifting towards it.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from vleff.checks import check_bool, check_choice, check_int, check_number
from vleff.tokens.madtp import FORWARDS, MADTPCalibration, _pair_and_module, batch_inputs, calibrate_madtp


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
    """

    def __init__(self, num_batches: int = 2, adjust_every_epoch: bool = True, rtol: float = 0.005,
                 max_evals: int = 40, epoch_max_evals: int = 12, measure: str = "pair",
                 samples: int | None = None) -> None:
        self.num_batches = check_int("calibration_batches", num_batches, low=1)
        self.adjust_every_epoch = check_bool("adjust_every_epoch", adjust_every_epoch)
        self.rtol = check_number("rtol", rtol, low=0, low_open=True)
        self.max_evals = check_int("max_evals", max_evals, low=2)
        self.epoch_max_evals = check_int("epoch_max_evals", epoch_max_evals, low=2)
        self.measure = check_choice("measure", measure, tuple(FORWARDS))
        self.samples = None if samples is None else check_int("samples", samples, low=1)
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

    def calibrate(self, model: nn.Module, epoch: int | None = None) -> MADTPCalibration:
        """Search τ on the stored batches (``epoch``: a per-epoch adjustment from the current τ)."""
        if self.batches is None:
            raise RuntimeError("MADTP calibration has no batches; call capture(loader) first")
        result = calibrate_madtp(model, self.batches, rtol=self.rtol, baseline=self.baseline,
                                 forward=FORWARDS[self.measure], samples=self.samples,
                                 max_evals=self.max_evals if epoch is None else self.epoch_max_evals)
        self.baseline, self.tau = result.baseline, result.tau
        self.history.append({"epoch": epoch, "tau": result.tau, "ratio": result.ratio,
                             "evaluations": len(result.evaluations)})
        return result

    def restore(self, model: nn.Module) -> None:
        """Put the stored τ on ``model`` (after a checkpoint was loaded)."""
        if self.tau is not None:
            _pair_and_module(model)[1].tau = self.tau

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "baseline": self.baseline, "history": list(self.history),
                "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = None if state.get("tau") is None else float(state["tau"])
        self.baseline = state.get("baseline")
        self.history = list(state.get("history", []))
        batches = state.get("batches")
        self.batches = None if batches is None else [tuple(t for t in b) for b in batches]
