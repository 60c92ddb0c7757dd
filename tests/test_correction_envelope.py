"""The per-step correction envelope (StepLimit's ``envelope``; TuneOptions.envelope_margin):
what it bounds, step by step, and what tune calibrates from the pilot, which changes no
choice and no pilot row (benchmarks/correction_envelope.md)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.bench.tuned import without_calibrated_limits
from dpmsolver.steplimit import StepLimit, StepRatios, check_step_envelope
from dpmsolver.tune import TuneOptions
from tests.test_step_limit import _corrected

SD = dp.DiscreteVPSchedule()


def test_only_corrections_over_the_steps_bound_change_and_they_end_on_it() -> None:
    s, t, x, x0, x1, _, x_next = _corrected([0.5, 1.0, 3.0, 30.0], seed=3)
    c = (x_next - x1).norm(dim=1)
    bound = float(c[1]) * 1.5  # between the second and the third sample's correction
    out = StepLimit(None, (0.0, bound)).apply(x, x0, x_next, s, t, 1)
    assert torch.equal(out[:2], x_next[:2])  # within the bound: bit for bit
    assert (out - x1).norm(dim=1)[2:].tolist() == pytest.approx([bound, bound])
    # the direction of the correction is kept
    cos = torch.nn.functional.cosine_similarity(out[2:] - x1[2:], x_next[2:] - x1[2:])
    assert cos.tolist() == pytest.approx([1.0, 1.0])
    # step 0's entry is 0: no bound there
    assert torch.equal(StepLimit(None, (0.0, bound)).apply(x, x0, x_next, s, t, 0), x_next)


def test_the_envelope_and_the_ratio_limit_bind_together() -> None:
    s, t, x, x0, x1, _, x_next = _corrected([0.5, 3.0], seed=4)
    big = 1e9
    both = StepLimit(2.0, (big,)).apply(x, x0, x_next, s, t, 0)
    assert torch.equal(both, StepLimit(2.0).apply(x, x0, x_next, s, t, 0))
    tiny = float((x_next - x1).norm(dim=1).min()) / 2
    out = StepLimit(2.0, (tiny,)).apply(x, x0, x_next, s, t, 0)
    assert (out - x1).norm(dim=1).tolist() == pytest.approx([tiny, tiny])


def test_a_step_past_the_envelope_is_refused() -> None:
    s, t, x, x0, _, _, x_next = _corrected([1.0], seed=5)
    with pytest.raises(ValueError, match="envelope has 2 entries but step 2"):
        StepLimit(None, (1.0, 1.0)).apply(x, x0, x_next, s, t, 2)


@pytest.mark.parametrize("bad", [[-1.0], [math.nan], [math.inf], ["1"], "12"])
def test_bad_envelopes_are_named(bad: object) -> None:
    with pytest.raises(ValueError, match="step_envelope"):
        dp.Recipe("unipc", step_envelope=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="envelope"):
        StepLimit(None, bad)  # type: ignore[arg-type]


def test_a_limit_needs_a_bound_and_the_margin_is_checked() -> None:
    with pytest.raises(ValueError, match="kappa, envelope or both"):
        StepLimit(None)
    assert dp.Recipe("unipc").step_limiter() is None
    limit = dp.Recipe("unipc", step_envelope=(1.0, 0.0), envelope_persistence=2).step_limiter()
    assert isinstance(limit, StepLimit) and limit.kappa == math.inf
    assert limit.envelope == (1.0, 0.0) and limit.persistence == 2
    assert check_step_envelope([1, 0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="envelope_margin"):
        TuneOptions(envelope_margin=0.5)


def test_the_probe_records_each_steps_largest_correction_after_its_limit() -> None:
    s, t, x, x0, x1, _, x_next = _corrected([0.5, 3.0, 1.0], seed=6)
    c = (x_next - x1).norm(dim=1)
    probe = StepRatios()
    probe.apply(x, x0, x_next, s, t, 2)
    assert probe.corrections[:2] == [0.0, 0.0]
    assert probe.corrections[2] == pytest.approx(float(c.max()))
    limited = StepRatios(StepLimit(1.0))
    out = limited.apply(x, x0, x_next, s, t, 0)
    assert limited.corrections[0] == pytest.approx(float((out - x1).norm(dim=1).max()))
    assert limited.corrections[0] < float(c.max())
    assert limited.largest == pytest.approx(1.0)


@pytest.fixture(scope="module")
def profiles() -> tuple[dp.Profile, dp.Profile]:
    pytest.importorskip("scipy")
    from tests.test_tune import CHEAP, COND, NET, Z

    args = dict(schedule=SD, guidance_scale=7.5, nfe=[6, 10, 14], **COND, **CHEAP)
    on = dp.tune(NET, Z, envelope_margin=2.0, **args)
    off = dp.tune(NET, Z, **args)
    return on, off


def test_the_envelope_changes_no_choice(profiles: tuple[dp.Profile, dp.Profile]) -> None:
    on, off = profiles
    enveloped = 0
    for a, b in zip(on.choices, off.choices, strict=True):
        assert b.recipe.step_envelope is None
        bare = dataclasses.replace(
            a.with_recipe(step_envelope=None), seconds=b.seconds, evaluations=b.evaluations
        )
        assert bare == b  # the same choice, scored the same on the pilot
        if a.recipe.step_envelope is not None:
            enveloped += 1
            plan = a.recipe.plan(SD, nfe=None if a.recipe.timesteps else a.nfe)
            assert len(a.recipe.step_envelope) == len(plan.steps)
            assert any(v > 0.0 for v in a.recipe.step_envelope)
    assert enveloped > 0


def test_no_pilot_row_reaches_the_envelope(profiles: tuple[dp.Profile, dp.Profile]) -> None:
    from tests.test_tune import COND, NET, Z

    on, off = profiles

    def run(p: dp.Profile, nfe: int) -> torch.Tensor:
        return dp.sample(
            NET, Z, schedule=SD, solver="auto", nfe=nfe, profile=p, guidance_scale=7.5, **COND
        ).x

    for c in on.choices:
        if c.recipe.step_envelope is None:
            continue
        free = run(off, c.nfe)
        assert torch.equal(run(on, c.nfe), free)
        # ... while a quarter of it moves a pilot row: the envelope is what the pilot reached
        tight = c.with_recipe(step_envelope=tuple(v / 4 for v in c.recipe.step_envelope))
        assert not torch.equal(run(dataclasses.replace(on, choices=(tight,)), c.nfe), free)


def test_the_profile_keeps_the_envelope_and_the_bench_can_remove_it(
    profiles: tuple[dp.Profile, dp.Profile],
) -> None:
    on, off = profiles
    assert dp.Profile.from_json(on.to_json()) == on
    data = off.to_json()
    data["format"] = "dpmsolver-profile/13"  # before the envelope
    for c in data["choices"]:
        del c["step_envelope"]
    assert all(c.recipe.step_envelope is None for c in dp.Profile.from_json(data).choices)
    bare = without_calibrated_limits(on)
    for a, b in zip(bare.choices, off.choices, strict=True):
        assert dataclasses.replace(a, seconds=b.seconds, evaluations=b.evaluations) == b


def test_the_diffusers_scheduler_bounds_as_sample_does() -> None:
    pytest.importorskip("scipy")
    pytest.importorskip("diffusers")
    from tests.test_step_limit import _profiles, _scheduler_run
    from tests.test_tune import NET, Z

    free_prof, _ = _profiles("unipc", {"order": 2}, 1.0)
    c = free_prof.choices[0]
    steps = len(c.recipe.plan(SD, nfe=9).steps)
    bound = c.with_recipe(step_envelope=(0.05,) * steps)
    tight_prof = dataclasses.replace(free_prof, choices=(bound,))
    z = Z[:6]
    free = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=free_prof).x
    tight = dp.sample(NET, z, schedule=SD, solver="auto", nfe=9, profile=tight_prof).x
    change = float((tight - free).abs().max())
    assert change > 1e-3  # the envelope binds here
    got_tight, got_free = (_scheduler_run(p, z, 9) for p in (tight_prof, free_prof))
    # float32 betas move both scheduler runs alike; the envelope's change must be sample()'s
    assert float(((got_tight - got_free) - (tight - free)).abs().max()) < 0.15 * change


def test_with_persistence_the_envelope_binds_after_consecutive_steps_over_it() -> None:
    s, t, x, x0, x1, _, x_next = _corrected([0.5, 3.0, 30.0], seed=7)
    c = (x_next - x1).norm(dim=1)
    # step 0: samples 1 and 2 are over; step 1: only sample 2; step 2: only sample 2 again
    e0, e1 = float(c[0]) * 1.5, float(c[1]) * 1.5
    limit = StepLimit(None, (e0, e1, e1), persistence=2)
    assert torch.equal(limit.apply(x, x0, x_next, s, t, 0), x_next)  # a first step over
    out = limit.apply(x, x0, x_next, s, t, 1)
    assert torch.equal(out[:2], x_next[:2])  # sample 1 was over at step 0 only
    assert float((out[2] - x1[2]).norm()) == pytest.approx(e1)  # sample 2: twice in a row
    # ... and from then on at every step, even where it would not have been over twice
    out = limit.apply(x, x0, x_next, s, t, 2)
    assert float((out[2] - x1[2]).norm()) == pytest.approx(e1)
    # a run starts again at step 0, and persistence 1 is the plain envelope
    assert torch.equal(limit.apply(x, x0, x_next, s, t, 0), x_next)
    plain = StepLimit(None, (e0,)).apply(x, x0, x_next, s, t, 0)
    assert not torch.equal(plain, x_next)
    with pytest.raises(ValueError, match="persistence"):
        StepLimit(None, (1.0,), persistence=0)
    with pytest.raises(ValueError, match="envelope_persistence"):
        dp.Recipe("unipc", envelope_persistence=0)
    with pytest.raises(ValueError, match="envelope_persistence"):
        TuneOptions(envelope_persistence=0)


def test_a_step_tried_again_does_not_count_twice() -> None:
    """Stage (g)'s fit may try a step more than once before it is taken: the run of steps
    over the envelope is kept per step index, not per call."""
    s, t, x, x0, x1, _, x_next = _corrected([0.5, 30.0], seed=8)
    e = float((x_next - x1).norm(dim=1)[0]) * 1.5
    limit = StepLimit(None, (e, e), persistence=2)
    for _ in range(3):
        assert torch.equal(limit.apply(x, x0, x_next, s, t, 0), x_next)
    out = limit.apply(x, x0, x_next, s, t, 1)
    assert float((out[1] - x1[1]).norm()) == pytest.approx(e)
