"""Stage (c) of tune: the network's time at each knot moved off the knot (LD3's decoupled
time). The grid and the recipe carry it to the network, tune keeps it only where the
held-out half improves, profiles store it, and the front ends that cannot apply it say so."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.timegrid import make_grid, shift_model_times
from dpmsolver.tune import PROFILE_FORMAT

from .test_tune import COND, NET, SD, Y, Z
from .test_tune import FAST as TUNE_FAST

pytest.importorskip("scipy")

# test_tune's cheap options with stage (c), the subject here, back on
FAST = {k: v for k, v in TUNE_FAST.items() if k != "shift_runs"}


def test_a_shift_moves_only_the_time_the_network_is_told() -> None:
    grid = make_grid(SD, 4, "logsnr", final="zero")
    shifted = shift_model_times(grid, [0.0, 0.3, -0.2, 0.0])
    for k, s, d in zip(grid.knots, shifted.knots, [0.0, 0.3, -0.2, 0.0, None], strict=True):
        assert (s.t, s.lam, s.alpha, s.sigma) == (k.t, k.lam, k.alpha, k.sigma)
        if d is None or d == 0.0:
            assert s.model_t == k.model_t
        else:
            assert s.model_t == pytest.approx(SD.knot_at_lambda(k.lam + d).model_t)
            # a larger log-SNR is a smaller (less noisy) time
            assert (s.model_t < k.model_t) == (d > 0)
    # clamped to the schedule's range
    far = shift_model_times(grid, [0.0, 0.0, 0.0, 50.0])
    assert far.knots[3].model_t == pytest.approx(SD.knot(SD.t_min).model_t)


def test_bad_shifts_are_named() -> None:
    grid = make_grid(SD, 4, "logsnr", final="zero")
    with pytest.raises(ValueError, match=r"model_shifts: one per noisy knot, i\.e\. 4"):
        shift_model_times(grid, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"model_shifts\[1\]"):
        shift_model_times(grid, [0.0, math.nan, 0.0, 0.0])
    flow = dp.RectifiedFlowSchedule()
    fgrid = make_grid(flow, 3, "time_uniform", final="zero", t_start=1.0)
    assert fgrid.knots[0].lam == -math.inf
    with pytest.raises(ValueError, match="pure noise"):
        shift_model_times(fgrid, [0.1, 0.0, 0.0])
    with pytest.raises(ValueError, match="model_shifts: one per noisy knot"):
        Recipe("dpmpp_2m", grid="logsnr", model_shifts=(0.1,)).plan(SD, nfe=6)


def test_the_network_sees_the_shifted_times() -> None:
    seen: list[float] = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(float(t.flatten()[0]))
        return NET(x, t, y=torch.zeros(x.shape[0], dtype=torch.long))

    shifts = (0.0, 0.2, -0.1, 0.05, 0.0, 0.1)
    recipe = Recipe("dpmpp_2m", grid="logsnr", model_shifts=shifts)
    plain = dataclasses.replace(recipe, model_shifts=None)
    a = dp.sample(net, Z[:2], schedule=SD, solver=recipe, nfe=6)
    got = list(seen)
    seen.clear()
    b = dp.sample(net, Z[:2], schedule=SD, solver=plain, nfe=6)
    knots = plain.plan(SD, nfe=6).grid.knots
    assert len(got) == len(seen) == 6
    top = SD.knot(SD.t_min).lam  # a shift past the schedule's end stops there
    for t_shift, t_own, k, d in zip(got, seen, knots, shifts, strict=False):
        assert t_own == pytest.approx(k.model_t)
        assert t_shift == pytest.approx(SD.knot_at_lambda(min(k.lam + d, top)).model_t)
    assert not torch.equal(a.x, b.x)


@pytest.fixture(scope="module")
def pair() -> tuple[dp.Profile, dp.Profile]:
    # without the tail check, which on this model takes the fitted knots back to stage (a)
    # (tests/test_tune_tail.py tests it): these tests are about stages (b) and (c)
    kw = dict(schedule=SD, guidance_scale=5.0, nfe=[6, 8], tail_rows=0, **COND, **FAST)
    return dp.tune(NET, Z, shift_runs=40, **kw), dp.tune(NET, Z, shift_runs=0, **kw)


def test_tune_keeps_shifts_only_where_the_held_out_half_improves(
    pair: tuple[dp.Profile, dp.Profile],
) -> None:
    shifted, plain = pair
    took = 0
    for c in shifted.choices:
        p = plain.choice(c.nfe, c.guidance_scale)
        assert p is not None
        if c.stage == "shifts":
            took += 1
            assert c.recipe.model_shifts is not None
            noisy = [
                k for k in c.recipe.plan(SD, nfe=None if c.recipe.timesteps else c.nfe).grid.knots
            ]
            assert len(c.recipe.model_shifts) == sum(k.sigma > 0 for k in noisy)
            assert max(abs(v) for v in c.recipe.model_shifts) <= 0.1  # the trust region
            # stage (c) starts from the plain profile's choice and must beat it held out
            assert c.heldout_error < p.heldout_error
            assert dataclasses.replace(c.recipe, model_shifts=None) == p.recipe
        else:
            assert c.recipe.model_shifts is None and c.heldout_error == p.heldout_error
    # on this model the shifts pay off (a stage that never moves would fail here)
    assert took >= 1


def test_profiles_store_the_shifts_and_read_version_1(
    pair: tuple[dp.Profile, dp.Profile], tmp_path: Path
) -> None:
    shifted, plain = pair
    path = tmp_path / "p.json"
    shifted.save(path)
    assert dp.Profile.load(path) == shifted
    data = plain.to_json()
    data["format"] = "dpmsolver-profile/1"
    for c in data["choices"]:
        del c["model_shifts"]
    old = tmp_path / "v1.json"
    old.write_text(json.dumps(data))
    again = dp.Profile.load(old)
    assert again.format == PROFILE_FORMAT
    assert [c.recipe for c in again.choices] == [c.recipe for c in plain.choices]


def test_sample_runs_the_shifted_choice_and_sigmas_drop_it_with_a_warning(
    pair: tuple[dp.Profile, dp.Profile],
) -> None:
    shifted, _ = pair
    c = next(c for c in shifted.choices if c.recipe.model_shifts is not None)
    kw = dict(cond={"y": Y[:4]}, uncond={"y": torch.full_like(Y[:4], 3)}, guidance_scale=5.0)
    a = dp.sample(NET, Z[:4], schedule=SD, solver="auto", nfe=c.nfe, profile=shifted, **kw)
    b = dp.sample(
        NET, Z[:4], schedule=SD, solver=c.recipe, nfe=None if c.recipe.timesteps else c.nfe, **kw
    )
    assert torch.equal(a.x, b.x)
    with pytest.warns(UserWarning, match=r"model_shifts.*dropped.*shift_runs=0"):
        sig = shifted.sigmas(c.nfe, 5.0, SD)
    plain = dataclasses.replace(c.recipe, model_shifts=None)
    assert sig == plain.plan(SD, nfe=None if c.recipe.timesteps else c.nfe).grid.ksigmas


def test_the_diffusers_scheduler_tells_the_network_the_shifted_times(
    pair: tuple[dp.Profile, dp.Profile],
) -> None:
    pytest.importorskip("diffusers")
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler

    shifted, _ = pair
    c = next(c for c in shifted.choices if c.recipe.model_shifts is not None)
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = DPMSolverScheduler(solver="auto", guidance_scale=5.0, profile=shifted, **sd)
    sched.set_timesteps(c.nfe)
    plan = c.recipe.plan(SD, nfe=None if c.recipe.timesteps else c.nfe)
    want = [k.model_t for k in plan.grid.knots if k.sigma > 0]
    torch.testing.assert_close(
        sched.timesteps.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-4, atol=1e-3
    )
    # custom sigmas: the shifts belong to the profile's own knots, so they are dropped, said
    with pytest.warns(UserWarning, match="model-time shifts are not applied"):
        sched.set_timesteps(sigmas=torch.logspace(1.1, -1.5, c.nfe).tolist())


def test_the_diffusers_scheduler_runs_a_choice_on_fitted_knots(
    pair: tuple[dp.Profile, dp.Profile],
) -> None:
    """A choice whose knots tune fitted (stage (b)) brings its own budget: the scheduler
    plans it without one (it raised 'steps/nfe are implied by timesteps' before)."""
    pytest.importorskip("diffusers")
    from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler

    _, plain = pair
    fitted = [c for c in plain.choices if c.recipe.timesteps is not None]
    assert fitted, "stage (b) fitted no knots on this model"
    c = fitted[0]
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sched = DPMSolverScheduler(solver="auto", guidance_scale=5.0, profile=plain, **sd)
    sched.set_timesteps(c.nfe)
    want = torch.tensor(plain.sigmas(c.nfe, 5.0, SD), dtype=torch.float64)
    torch.testing.assert_close(sched.sigmas.double(), want, rtol=1e-4, atol=0)


def test_the_shifts_stay_within_their_bound() -> None:
    kw = dict(schedule=SD, guidance_scale=5.0, nfe=[6], **COND, **FAST)
    tight = dp.tune(NET, Z, shift_runs=40, shift_bound=0.01, **kw).choices[0]
    if tight.recipe.model_shifts is not None:
        assert max(abs(v) for v in tight.recipe.model_shifts) <= 0.01
    with pytest.raises(ValueError, match="shift_bound"):
        dp.tune(NET, Z, shift_bound=0.0, **kw)
