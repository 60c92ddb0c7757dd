"""The step limit calibrated on the pilot (TuneOptions.step_limit_margin): the limit tune
sets from the pilot's largest correction ratio (the probe, steplimit.StepRatios, is tested
in test_step_limit.py), which changes no choice, and the profile's record of it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpmsolver as dp
from dpmsolver.bench.tuned import without_calibrated_limits
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.options import STEP_LIMIT_FLOOR

SD = dp.DiscreteVPSchedule()


def test_a_margin_below_one_is_named() -> None:
    with pytest.raises(ValueError, match="step_limit_margin"):
        TuneOptions(step_limit_margin=0.5)


@pytest.fixture(scope="module")
def profiles() -> tuple[dp.Profile, dp.Profile]:
    pytest.importorskip("scipy")
    from tests.test_tune import CHEAP, COND, NET, Z

    args = dict(schedule=SD, guidance_scale=7.5, nfe=[6, 10, 14], **COND, **CHEAP)
    # stage (d) off, so that every higher-order choice is one the calibration applies to
    on = dp.tune(NET, Z, step_limit=None, step_limit_margin=1.5, **args)
    off = dp.tune(NET, Z, step_limit=None, **args)
    return on, off


def test_the_calibrated_limit_changes_no_choice(profiles: tuple[dp.Profile, dp.Profile]) -> None:
    on, off = profiles
    calibrated = 0
    for a, b in zip(on.choices, off.choices, strict=True):
        assert b.recipe.step_limit is None and b.pilot_correction is None
        if a.pilot_correction is None:
            assert a.recipe.step_limit is None
        else:
            calibrated += 1
            assert a.pilot_correction > 0.0
            assert a.recipe.step_limit == max(STEP_LIMIT_FLOOR, 1.5 * a.pilot_correction)
        bare = dataclasses.replace(
            a.with_recipe(step_limit=None),
            pilot_correction=None,
            seconds=b.seconds,
            evaluations=b.evaluations,
        )
        assert bare == b  # the same choice, scored the same on the pilot
    assert calibrated > 0


def test_no_pilot_row_reaches_the_limit(profiles: tuple[dp.Profile, dp.Profile]) -> None:
    from tests.test_tune import COND, NET, Z

    on, off = profiles
    for c in on.choices:
        if c.pilot_correction is None:
            continue
        runs = [
            dp.sample(
                NET,
                Z,
                schedule=SD,
                solver="auto",
                nfe=c.nfe,
                profile=p,
                guidance_scale=7.5,
                **COND,
            ).x
            for p in (on, off)
        ]
        assert torch.equal(runs[0], runs[1])
        # ... while a limit just under the pilot's largest ratio does move a pilot row
        tight = c.with_recipe(step_limit=max(1.0, 0.5 * c.pilot_correction))
        moved = dataclasses.replace(on, choices=(tight,))
        x = dp.sample(
            NET, Z, schedule=SD, solver="auto", nfe=c.nfe, profile=moved, guidance_scale=7.5, **COND
        ).x
        assert not torch.equal(x, runs[1])


def test_the_profile_keeps_the_ratio_and_the_bench_can_remove_the_limits(
    profiles: tuple[dp.Profile, dp.Profile],
) -> None:
    on, off = profiles
    assert dp.Profile.from_json(on.to_json()) == on
    data = off.to_json()
    data["format"] = "dpmsolver-profile/12"  # before the calibrated limit
    for c in data["choices"]:
        del c["pilot_correction"]
    assert all(c.pilot_correction is None for c in dp.Profile.from_json(data).choices)
    bare = without_calibrated_limits(on)
    for a, b in zip(bare.choices, off.choices, strict=True):
        assert dataclasses.replace(a, seconds=b.seconds, evaluations=b.evaluations) == b
