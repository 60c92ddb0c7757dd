"""Tuning the sampler to one model (dpmsolver.tune): what it chooses helps the held-out half
of the pilot, the profile round-trips and guards its use, and sample() uses it."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import exact_sample
from dpmsolver.tune import PROFILE_FORMAT, ProfileMismatchError, no_new_divergence, paired_better

pytest.importorskip("scipy")

SD = dp.DiscreteVPSchedule()
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=5)
NET = dp.MixtureNetwork(MIX, SD, "eps")
N = 24
Z = torch.randn(N, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
Y = torch.arange(N) % 3
COND = {"cond": {"y": Y}, "uncond": {"y": torch.full_like(Y, 3)}}
# stages (c), (f) and (g) off: these profiles are also read as k-diffusion sigmas
# (test_model_shifts.py tests it)
FAST = dict(
    fine_knots=16,
    refine_runs=12,
    screen_rows=8,
    finalists=2,
    shift_runs=0,
    compensation_runs=0,
    correction_components=0,
)
# the least tuning that still runs every stage but (f) and (g), for tests of what surrounds
# them (tests/test_compensation.py and tests/test_correction.py run those two, which would
# otherwise also move the choices that tests of the earlier stages compare)
CHEAP = {
    "fine_knots": 8,
    "refine_runs": 2,
    "screen_rows": 2,
    "fine_rows": 2,
    "finalists": 1,
    "step_bases": 1,
    "compensation_runs": 0,
    "correction_components": 0,
}


@pytest.fixture(scope="module")
def profile() -> dp.Profile:
    return dp.tune(NET, Z, schedule=SD, guidance_scale=[1.0, 5.0], nfe=[5, 8], **COND, **FAST)


def test_every_choice_is_no_worse_than_the_default_on_the_held_out_half(
    profile: dp.Profile,
) -> None:
    assert {(c.guidance_scale, c.nfe) for c in profile.choices} == {
        (1.0, 5),
        (1.0, 8),
        (5.0, 5),
        (5.0, 8),
    }
    for c in profile.choices:
        assert c.stage in ("default", "selection", "steps")
        assert math.isfinite(c.heldout_error) and c.heldout_error <= c.default_heldout_error
        if c.stage == "steps":
            assert c.recipe.timesteps is not None and len(c.recipe.timesteps) >= 2
            assert all(b < a for a, b in itertools.pairwise(c.recipe.timesteps))
        assert c.evaluations > 0 and c.seconds >= 0
    # the reference is 10x more accurate than the best choice
    assert profile.reference_error <= 0.1 * min(c.heldout_error for c in profile.choices)
    assert profile.pilot == N and profile.evaluations > 0


def test_some_stage_beyond_the_default_is_taken(profile: dp.Profile) -> None:
    """On this model the measured improvements are large; a tuner that never moves off the
    default would fail here."""
    assert any(c.stage != "default" for c in profile.choices)
    gains = [c.default_heldout_error / c.heldout_error for c in profile.choices]
    assert max(gains) > 1.3


def test_sample_with_the_profile_runs_the_choice(profile: dp.Profile) -> None:
    c = profile.choice(8, 5.0)
    assert c is not None
    z = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.arange(6) % 3
    kw = dict(cond={"y": y}, uncond={"y": torch.full_like(y, 3)}, guidance_scale=5.0)
    a = dp.sample(NET, z, schedule=SD, solver="auto", nfe=8, profile=profile, **kw)
    b = dp.sample(NET, z, schedule=SD, solver=c.recipe, nfe=None if c.recipe.timesteps else 8, **kw)
    assert a.nfe == 8 and torch.equal(a.x, b.x)
    sig = profile.sigmas(8, 5.0, SD)
    assert sig[-1] == 0.0 and all(x > y for x, y in itertools.pairwise(sig))


def test_a_missing_budget_falls_back_to_the_default_with_a_warning(profile: dp.Profile) -> None:
    with pytest.warns(UserWarning, match="no choice for nfe=6 at guidance 5"):
        r = dp.sample(
            NET,
            Z[:3],
            schedule=SD,
            solver="auto",
            nfe=6,
            profile=profile,
            cond={"y": Y[:3]},
            uncond={"y": torch.full_like(Y[:3], 3)},
            guidance_scale=5.0,
        )
    ref = dp.sample(
        NET,
        Z[:3],
        schedule=SD,
        solver="auto",
        nfe=6,
        cond={"y": Y[:3]},
        uncond={"y": torch.full_like(Y[:3], 3)},
        guidance_scale=5.0,
    )
    assert torch.equal(r.x, ref.x)


def test_a_profile_of_another_schedule_or_prediction_is_refused(profile: dp.Profile) -> None:
    flow = dp.RectifiedFlowSchedule()
    with pytest.raises(
        ProfileMismatchError, match=r"DiscreteVPSchedule.*prediction='eps'.*RectifiedFlowSchedule"
    ):
        profile.recipe(8, 5.0, flow, "eps")
    with pytest.raises(ProfileMismatchError, match=r"prediction='eps'.*prediction='v'"):
        dp.sample(NET, Z[:2], schedule=SD, prediction="v", solver="auto", nfe=8, profile=profile)
    with pytest.raises(ValueError, match="profile= is used with solver='auto'"):
        dp.sample(NET, Z[:2], schedule=SD, solver="dpmpp_2m", nfe=8, profile=profile)


def test_profile_files_round_trip_and_bad_files_are_named(
    profile: dp.Profile, tmp_path: Path
) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    assert dp.Profile.load(path) == profile
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT
    data["format"] = "dpmsolver-profile/0"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    expected = f"format 'dpmsolver-profile/0', expected '{PROFILE_FORMAT}'"
    with pytest.raises(ValueError, match=expected):
        dp.Profile.load(old)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not valid JSON"):
        dp.Profile.load(corrupt)
    data["format"] = PROFILE_FORMAT
    del data["choices"][0]["solver"]
    damaged = tmp_path / "damaged.json"
    damaged.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="damaged"):
        dp.Profile.load(damaged)
    with pytest.raises(ValueError, match="cannot read"):
        dp.Profile.load(tmp_path / "missing.json")


def test_bad_tune_arguments_are_named() -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rtoll'\]"):
        dp.tune(NET, Z, schedule=SD, rtoll=1e-3)
    with pytest.raises(ValueError, match="at least 4 noises"):
        dp.tune(NET, Z[:3], schedule=SD)
    with pytest.raises(ValueError, match="nfe\\[1\\] must be >= 1"):
        dp.tune(NET, Z, schedule=SD, nfe=[5, 0])
    with pytest.raises(ValueError, match="shift_runs must be >= 0"):
        dp.tune(NET, Z, schedule=SD, shift_runs=-1)
    with pytest.raises(ValueError, match="shift_rows must be >= 1"):
        dp.tune(NET, Z, schedule=SD, shift_rows=0)
    with pytest.raises(ValueError, match="prediction='epsilon'"):
        dp.tune(NET, Z, schedule=SD, prediction="epsilon")  # type: ignore[arg-type]


def test_paired_comparison_needs_both_the_rms_and_the_typical_sample() -> None:
    old = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert paired_better(torch.tensor([0.5, 0.5, 0.5, 0.5]), old)
    # one sample carries a lower RMS while most samples got worse: refused
    assert not paired_better(
        torch.tensor([0.01, 1.1, 1.1, 1.1]), torch.tensor([2.0, 1.0, 1.0, 1.0])
    )
    # most samples better but the RMS worse (one blows up): refused
    assert not paired_better(torch.tensor([0.5, 0.5, 0.5, 5.0]), old)
    assert not paired_better(torch.tensor([0.5, math.inf, 0.5, 0.5]), old)


def test_a_sample_may_not_newly_diverge() -> None:
    old = torch.tensor([0.1, 0.1, 1.38, 0.6])
    assert no_new_divergence(torch.tensor([0.05, 0.05, 1.43, 0.6]), old, spread=1.41)
    # a sample the old choice got right, sent beyond the spread: refused
    assert not no_new_divergence(torch.tensor([0.05, 1.5, 0.1, 0.6]), old, spread=1.41)
    # within the spread anything goes (the paired comparison judges it)
    assert no_new_divergence(torch.tensor([1.4, 1.4, 1.4, 1.4]), old, spread=1.41)
    # a sample already far under the old choice: at most twice as far
    assert no_new_divergence(torch.tensor([0.1, 0.1, 2.7, 1.2]), old, spread=1.41)
    assert not no_new_divergence(torch.tensor([0.1, 0.1, 2.8, 0.6]), old, spread=1.41)
    assert not no_new_divergence(torch.tensor([0.1, math.inf, 0.1, 0.1]), old, spread=1.41)


def test_the_diffusers_scheduler_runs_the_profile(profile: dp.Profile) -> None:
    pytest.importorskip("diffusers")
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler

    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = DPMSolverScheduler(solver="auto", guidance_scale=5.0, profile=profile, **sd)
    assert sched._resolve_policy(8) == profile.recipe(8, 5.0, SD, "eps")
    sched.set_timesteps(8)
    want = torch.tensor(profile.sigmas(8, 5.0, SD), dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas.double(), want, rtol=1e-4, atol=0)  # float32 betas
    # kept in the config as JSON, so the scheduler saves and reloads with it
    again = DPMSolverScheduler.from_config(json.loads(json.dumps(dict(sched.config))))
    assert again._resolve_policy(8) == sched._resolve_policy(8)
    with pytest.raises(ValueError, match="profile= holds recipes for solver='auto'"):
        DPMSolverScheduler(solver="dpmpp_2m", profile=profile, **sd)
    with pytest.raises(ProfileMismatchError, match="prediction='v'"):
        DPMSolverScheduler(solver="auto", prediction_type="v_prediction", profile=profile, **sd)
    with pytest.raises(ProfileMismatchError, match="DiscreteVPSchedule"):
        DPMSolverScheduler(solver="auto", profile=profile)  # DDPM's linear betas
    with pytest.raises(TypeError, match="profile= must be a dpmsolver Profile"):
        DPMSolverScheduler(solver="auto", profile=42, **sd)
    with pytest.raises(ValueError, match="profile= has format 'x'"):
        DPMSolverScheduler(solver="auto", profile={"format": "x"}, **sd)
    with pytest.raises(ValueError, match="profile= is damaged"):
        DPMSolverScheduler(solver="auto", profile={**profile.to_json(), "choices": [{}]}, **sd)


def test_a_loose_start_tolerance_is_tightened_until_the_reference_is_10x_better() -> None:
    """The reference starts loose (its cost is most of tune's) and its error, estimated on
    ``check_rows`` rows against a 10x tighter solve, must end 10x below the best choice's."""
    p = dp.tune(
        NET, Z, schedule=SD, guidance_scale=3.0, nfe=[8], rtol=0.3, check_rows=6, **COND, **FAST
    )
    assert p.reference_rtol < 0.3  # it was tightened
    assert p.reference_error <= 0.1 * min(c.heldout_error for c in p.choices)
    # the estimate is what a full check says, to within its order of magnitude
    x_T = Z * SD.knot(SD.t_max).sigma
    den = dp.build_denoiser(NET, "eps", guidance_scale=3.0, **COND)
    ref = exact_sample(den, x_T, SD, rtol=p.reference_rtol)
    tighter = exact_sample(den, x_T, SD, rtol=p.reference_rtol / 10)
    full = float((ref - tighter).pow(2).mean().sqrt())  # every row, not only check_rows
    assert full / 10 < p.reference_error < full * 10


def test_budgets_tuned_side_by_side_choose_exactly_what_one_thread_chooses() -> None:
    """``workers`` only changes the time: each budget runs on one intra-op thread either
    way, so the choices and errors are bit for bit the same, and the process's thread count
    is restored afterwards. The evaluation counts are the same without the tail check; with
    it, a budget in another worker solves again the guard references an earlier budget
    solved (one worker shares them), so side by side costs at least as many."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kw = dict(schedule=SD, guidance_scale=5.0, nfe=[5, 6, 8], **COND, **FAST)
        one = dp.tune(NET, Z, workers=1, **kw)
        torch.set_num_threads(3)
        two = dp.tune(NET, Z, workers=2, **kw)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

    def strip(p: dp.Profile) -> list[dict]:
        skip = ("seconds", "evaluations")
        return [{k: v for k, v in vars(c).items() if k not in skip} for c in p.choices]

    assert [c.nfe for c in two.choices] == [5, 6, 8]
    assert strip(one) == strip(two)
    assert two.evaluations >= one.evaluations
    torch.set_num_threads(1)
    try:
        untailed = {**kw, "tail_rows": 0}
        one, two = dp.tune(NET, Z, workers=1, **untailed), dp.tune(NET, Z, workers=2, **untailed)
    finally:
        torch.set_num_threads(before)
    assert [c.evaluations for c in one.choices] == [c.evaluations for c in two.choices]
    assert strip(one) == strip(two)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        dp.tune(NET, Z, workers=0, **kw)


def test_worst_factor_refuses_choices_that_worsen_the_worst_held_out_sample() -> None:
    """With a factor no choice can meet (its worst sample a billionth of the default's),
    every budget keeps the default; the factor is checked like the other options."""
    p = dp.tune(
        NET, Z, schedule=SD, guidance_scale=5.0, nfe=[5, 8], worst_factor=1e-9, **COND, **FAST
    )
    assert [c.stage for c in p.choices] == ["default", "default"]
    with pytest.raises(ValueError, match="worst_factor"):
        dp.tune(NET, Z, schedule=SD, worst_factor=0.0)
