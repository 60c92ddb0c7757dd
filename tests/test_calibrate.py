"""Optimized time steps (dpmsolver.calibrate): never worse on the calibration set, better on
unseen noise where the benchmark says so, and usable through the public sampler."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.auto import recommend
from dpmsolver.bench.accuracy import mixture_problem
from dpmsolver.calibrate import calibrate_steps, rms_error, run_calibrated

pytest.importorskip("scipy")


def test_calibration_never_raises_the_calibration_error_and_keeps_a_valid_grid() -> None:
    cal = mixture_problem(7.5, batch=16, seed=3, noise_seed=11)
    fit = calibrate_steps(
        cal.denoiser, cal.x_T, cal.reference, cal.schedule, 6, guidance_scale=7.5, max_evals=40
    )
    assert fit.recipe == recommend(6, 7.5)
    assert fit.error <= fit.start_error
    assert fit.accepted == (fit.validation_error < fit.validation_start)
    if not fit.accepted:  # the recipe's own knots come back
        assert fit.validation_error == fit.validation_start and fit.error == fit.start_error
    plan = fit.recipe.plan(cal.schedule, nfe=6)
    orders, grid = plan.orders, plan.grid
    assert len(fit.sigmas) == len(orders) + 1 and fit.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(fit.sigmas, fit.sigmas[1:], strict=False))
    assert math.isclose(fit.sigmas[0], grid.knots[0].ksigma, rel_tol=1e-12)
    assert fit.sigmas[-2] >= cal.schedule.knot(cal.schedule.t_min).ksigma * (
        1 - 1e-9
    )  # within the schedule
    x = run_calibrated(cal.denoiser, cal.x_T, cal.schedule, fit.recipe, 6, fit.lams)
    assert x is not None and math.isclose(
        rms_error(x[0::2], cal.reference[0::2]), fit.error, rel_tol=1e-9
    )
    assert math.isclose(rms_error(x[1::2], cal.reference[1::2]), fit.validation_error, rel_tol=1e-9)


def test_calibrated_steps_help_on_noise_they_never_saw() -> None:
    # Guidance 7.5 and 8 evaluations on four mixtures: calibrate on 512 noise draws of each
    # (256 fitted, 256 validating) and score on 256 others. The gain is real but uneven
    # (heavy-tailed errors; README: ratios 0.60-1.14 here), so the claim tested is the
    # aggregate one: better on average, and a kept fit is never much worse on unseen noise.
    ratios = []
    for seed in (3, 4, 5, 6):
        cal = mixture_problem(7.5, batch=512, seed=seed, noise_seed=5000 + seed)
        test = mixture_problem(7.5, batch=256, seed=seed)
        fit = calibrate_steps(
            cal.denoiser, cal.x_T, cal.reference, cal.schedule, 8, guidance_scale=7.5, max_evals=150
        )
        before = run_calibrated(test.denoiser, test.x_T, test.schedule, fit.recipe, 8)
        after = run_calibrated(test.denoiser, test.x_T, test.schedule, fit.recipe, 8, fit.lams)
        assert before is not None and after is not None
        ratios.append(rms_error(after, test.reference) / rms_error(before, test.reference))
    assert max(ratios) <= 1.2 and math.prod(ratios) ** (1 / len(ratios)) < 0.95, ratios


def test_a_fit_that_does_not_carry_over_to_the_held_out_half_is_dropped() -> None:
    # Validation references equal to what the recipe's own knots produce: any moved knot
    # makes the held-out half worse, so the recipe's knots must come back.
    cal = mixture_problem(7.5, batch=32, seed=3, noise_seed=9)
    recipe = recommend(8, 7.5)
    on_recipe = run_calibrated(cal.denoiser, cal.x_T, cal.schedule, recipe, 8)
    assert on_recipe is not None
    ref = cal.reference.clone()
    ref[1::2] = on_recipe[1::2]
    fit = calibrate_steps(
        cal.denoiser, cal.x_T, ref, cal.schedule, 8, guidance_scale=7.5, max_evals=30
    )
    assert fit.validation_start < 1e-12 and not fit.accepted  # zero up to the knots' round trip
    assert fit.error == fit.start_error > 0 and fit.validation_error == fit.validation_start
    knots = recipe.plan(cal.schedule, nfe=8).grid.knots[:-1]
    torch.testing.assert_close(
        torch.tensor(fit.sigmas),
        torch.tensor([*(k.ksigma for k in knots), 0.0]),
        rtol=1e-12,
        atol=0,
    )


def test_fitted_sigmas_drive_the_public_sampler() -> None:
    sched = dp.DiscreteVPSchedule()
    mix = dp.default_mixture(dim=4, num_classes=2)
    y = torch.tensor([0, 1, 0, 1])
    den = dp.MixtureDenoiser(mix, y=y, guidance_scale=3.0)
    x_T = (
        torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * sched.knot(sched.t_max).sigma
    )
    ref = dp.analytic.reference_sample(den, x_T, sched, rtol=1e-7)
    fit = calibrate_steps(den, x_T, ref, sched, 8, guidance_scale=3.0, max_evals=30)
    net = dp.MixtureNetwork(mix, sched)
    r = dp.sample(
        net,
        x_T / sched.knot(sched.t_max).sigma,
        schedule=sched,
        sigmas=list(fit.sigmas),
        cond={"y": y},
        uncond={"y": torch.full_like(y, 2)},
        guidance_scale=3.0,
        solver=dp.Recipe(
            fit.recipe.solver, {**fit.recipe.options}, final_step=fit.recipe.final_step
        ),
    )
    direct = run_calibrated(den, x_T, sched, fit.recipe, 8, fit.lams)
    assert direct is not None and r.nfe == 8
    torch.testing.assert_close(r.x, direct, rtol=1e-6, atol=1e-6)


def test_bad_arguments_name_the_parameter() -> None:
    cal = mixture_problem(3.0, batch=4, seed=0, noise_seed=1)
    with pytest.raises(ValueError, match="max_evals must be >= 1"):
        calibrate_steps(cal.denoiser, cal.x_T, cal.reference, cal.schedule, 8, max_evals=0)
    with pytest.raises(ValueError, match="lams: nfe=8"):
        run_calibrated(cal.denoiser, cal.x_T, cal.schedule, recommend(8, 3.0), 8, [0.0, 1.0])
