"""MADTP's settings have one owner each (issue 25): τ lives on the model's MADTP module, the FLOPs
controller's settings in :class:`ControllerConfig`, ``flops_reduction``'s rule in one function."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import tiny_models as tm
import torch

from vleff.callbacks import MADTP, MADTPMixin
from vleff.methods.madtp.controller import ControllerConfig, MADTPController, hooks_config
from vleff.methods.madtp.core import apply_madtp, calibrate_madtp, check_flops_reduction, madtp_tau, update_madtp


def _calibrated():
    torch.manual_seed(0)
    model = tm.open_clip_model().eval()
    apply_madtp(model, flops_reduction=0.4, tau=2.0)
    batch = (tm.images(2, seed=1), tm.token_ids(2), None)
    return model, batch, calibrate_madtp(model, [batch], max_evals=8)


def test_tau_lives_on_the_module_and_the_config_keeps_the_starting_value():
    model, _, result = _calibrated()
    assert madtp_tau(model) == result.tau != 2.0
    assert hooks_config(model).tau == 2.0  # the config is what apply_madtp was given, not a second τ
    update_madtp(model, tau=5.0)
    assert madtp_tau(model) == 5.0 and hooks_config(model).tau == 2.0
    with pytest.raises(ValueError, match="tau"):
        update_madtp(model, tau=-1.0)  # validated by the config's rule
    assert madtp_tau(model) == 5.0


def test_the_controller_tau_is_its_last_calibration():
    model, batch, _ = _calibrated()
    controller = MADTPController(flops_reduction=0.4, calibration_batches=1, max_evals=6)
    assert controller.tau is None and not controller.calibrated
    controller.capture([batch])
    first = controller.calibrate(model)
    assert controller.tau == first.tau == controller.history[-1]["tau"] == madtp_tau(model)
    state = controller.state_dict()
    fresh = MADTPController(flops_reduction=0.4)
    fresh.load_state_dict(state)
    assert fresh.tau == first.tau
    with pytest.raises(ValueError, match="no calibration history"):
        MADTPController().load_state_dict({"tau": 1.0, "history": []})


def test_controller_defaults_and_rules_have_one_owner():
    owned = {f.name for f in dataclasses.fields(ControllerConfig)}
    # the callback and the mixin take the controller's names as keywords, with no default of their own
    for function in (MADTP.__init__, MADTPMixin.use_madtp, MADTPController.__init__):
        assert not owned & set(inspect.signature(function).parameters), function
    callback = MADTP(calibration_batches=3, rtol=0.02, flops_reduction=0.3)
    assert callback.controller.config == ControllerConfig(calibration_batches=3, rtol=0.02)
    assert callback.config.flops_reduction == callback.controller.flops_reduction == 0.3
    assert callback.state_dict()["target"] == 0.3
    with pytest.raises(ValueError, match="calibration_batches"):
        MADTP(calibration_batches=0)
    with pytest.raises(TypeError, match="not both"):
        MADTPController(ControllerConfig(), rtol=0.1)


@pytest.mark.parametrize("value", [0, 1, -0.5, 1.5, "half"])
def test_flops_reduction_has_one_rule(value):
    for build in (
        check_flops_reduction,
        lambda v: MADTPController(flops_reduction=v),
        lambda v: MADTP(flops_reduction=v),
    ):
        with pytest.raises((ValueError, TypeError), match="flops_reduction"):
            build(value)
