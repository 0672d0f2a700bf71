"""ToMe's r has one validator (:func:`check_r`, run by the config) and one expansion per tower
(:func:`r_per_block`); a schedule hands every tower one progress value and each scales its own r."""

from __future__ import annotations

import pytest
from test_tome_unequal_towers import _clip, _expected, _running

from vleff.methods.tome import ToMeConfig, apply_tome
from vleff.methods.tome.core import check_r, r_per_block, set_tome_progress
from vleff.methods.tome.schedule import RSchedule


@pytest.mark.parametrize(
    "bad, match",
    [
        (-1, "non-negative"),
        ([1, -2], r"r\[1\]=-2"),
        ((4, 2.0), "inflection"),
        ({"r": 4}, "exactly the keys"),
        ("4", "must be an int"),
        ((1, 2, 3), "tuple"),
    ],
)
def test_check_r_refuses_without_a_depth_and_the_config_and_schedule_use_it(bad, match):
    for build in (check_r, lambda r: ToMeConfig(r=r), lambda r: RSchedule(r=r)):
        with pytest.raises(ValueError, match=match):
            build(bad)


def test_a_list_longer_than_the_tower_is_refused_when_applied_naming_the_depth():
    config = ToMeConfig(r=[1] * 6, towers="image")  # fine without a tower
    with pytest.raises(ValueError, match="r has 6 entries but the tower has only 4 blocks"):
        apply_tome(_clip(4, 2), config)


@pytest.mark.parametrize("r", [3, (4, 0.5)])
def test_r_per_block_expands_a_checked_spec_like_the_reference(r):
    for depth in (2, 5):
        assert r_per_block(check_r(r), depth) == _expected(r, depth)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_one_progress_value_scales_each_tower_from_its_own_depth(progress):
    model = _clip(4, 2)
    apply_tome(model, r=(4, 0.5), towers="all")
    set_tome_progress(model, progress)
    assert _running(model) == {"image": _expected((4, 0.5), 4, progress), "text": _expected((4, 0.5), 2, progress)}
    schedule = RSchedule(r=(4, 0.5), schedule="linear", warmup_steps=4)
    assert schedule.progress_at(2) == 0.5 and schedule.progress_at(9) == 1.0
    with pytest.raises(ValueError, match=r"progress=1.5 must be in \[0, 1\]"):
        set_tome_progress(model, 1.5)
