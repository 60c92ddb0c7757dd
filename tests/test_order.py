"""Measured convergence order of every registered solver on an exact problem.

The solver list is the registry itself (``dpmsolver.solvers.configurations``), so a newly
registered solver is checked automatically. Errors are max-abs against a Dormand-Prince
reference (local tolerance 1e-12) in float64; the order is the least-squares slope of
log(error) against log(NFE) over the finest three runs, and must be within 0.3 of the
solver's claimed order.
"""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.orders import ExactProblem, exact_problem, measure_order, run_fixed, slope
from dpmsolver.solvers import AdaptiveSolver, MultistepSolver, Solver, configurations

CONFIGS = [c for c in configurations() if not c[2].stochastic]  # SDEs: tests/test_sde.py
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in cfg.items())}" for name, cfg, _ in CONFIGS]


@pytest.mark.parametrize(("name", "cfg", "solver"), CONFIGS, ids=IDS)
def test_convergence_order(sd_problem: ExactProblem, name: str, cfg: dict, solver: Solver) -> None:
    nfes, errs = measure_order(sd_problem, solver)
    p = slope(nfes, errs)
    claimed = solver.claimed_order
    if isinstance(solver, AdaptiveSolver):
        # The controller places steps where they matter, so error can fall faster with NFE
        # than the order alone predicts; it must never fall slower.
        assert p >= claimed - 0.3, (name, cfg, nfes, errs, p)
    else:
        assert abs(p - claimed) <= 0.3, (name, cfg, nfes, errs, p)
    assert errs[-1] < 1e-2  # and it actually converged to the exact answer


def test_registry_lists_every_solver_with_a_configuration() -> None:
    """Every registered solver is checked: by its order here or its distribution in test_sde."""
    covered = {name for name, _, _ in configurations()}
    assert covered == set(dp.REGISTRY)
    for name, _, solver in configurations():
        assert solver.stochastic or (name, solver) in {(n, s) for n, _, s in CONFIGS}


def test_third_order_fix_is_closer_to_exact_than_published_3m(sd_problem: ExactProblem) -> None:
    """Ours vs the published 3M update (half the second-derivative term)."""
    ours = dp.get_solver("dpmpp_3m")
    legacy = dp.get_solver("dpmpp_3m", third_order="legacy")
    for n in (40, 80, 160):
        e_ours = float((run_fixed(sd_problem, ours, n).x - sd_problem.reference).abs().max())
        e_legacy = float((run_fixed(sd_problem, legacy, n).x - sd_problem.reference).abs().max())
        assert e_ours < e_legacy, (n, e_ours, e_legacy)
    assert e_ours < 0.25 * e_legacy  # the gap widens with N: third vs second order


@pytest.mark.parametrize("solver_name", ["dpmpp_2m", "dpmpp_3m", "dpmpp_3s", "dpm_3m"])
def test_order_holds_with_final_step_to_zero(sd_problem: ExactProblem, solver_name: str) -> None:
    """A final x = D(x) step keeps the order when compared with D(exact x)."""
    solver = dp.get_solver(solver_name)
    sched = sd_problem.schedule
    ke = sched.knot(sd_problem.t_end)
    target = sd_problem.denoiser(sd_problem.reference, ke)
    errs, nfes = [], []
    for n in [80, 160, 320] if isinstance(solver, MultistepSolver) else [40, 80, 160]:
        grid = dp.make_grid(sched, n + 1, "logsnr", t_end=sd_problem.t_end, final="zero")
        r = dp.solve(sd_problem.denoiser, sd_problem.x_start, grid, solver, lower_order_final=False)
        assert r.orders[-1] == 1 and grid.final_zero
        errs.append(float((r.x - target).abs().max()))
        nfes.append(r.nfe)
    assert abs(slope(nfes, errs) - solver.claimed_order) <= 0.3, (errs, nfes)


@pytest.mark.parametrize(
    "schedule",
    [
        dp.ContinuousVPSchedule("linear"),
        dp.ContinuousVPSchedule("cosine"),
        dp.VESchedule(),
        dp.RectifiedFlowSchedule(t_max=0.999),
    ],
    ids=["vp_linear", "vp_cosine", "edm", "flow"],
)
@pytest.mark.parametrize("solver_name", ["dpmpp_2m", "dpmpp_3m", "dpm_3s"])
def test_order_on_other_schedules(schedule: dp.NoiseSchedule, solver_name: str) -> None:
    lam_mid = 0.5 * (schedule.knot(schedule.t_max).lam + schedule.knot(schedule.t_min).lam) + 2.0
    t_end = schedule.knot_at_lambda(lam_mid).t
    problem = exact_problem(schedule, t_end)
    nfes, errs = measure_order(problem, dp.get_solver(solver_name), finer=2)
    assert abs(slope(nfes, errs) - dp.get_solver(solver_name).claimed_order) <= 0.3, (errs, nfes)


def test_order_under_guidance() -> None:
    """The exact guided mixture (w = 4) keeps the orders: guidance changes the ODE, not the
    method."""
    problem = exact_problem(dp.DiscreteVPSchedule(), 50.0, guidance=4.0)
    for name in ("dpmpp_2m", "dpmpp_3m"):
        solver = dp.get_solver(name)
        nfes, errs = measure_order(problem, solver)
        assert abs(slope(nfes, errs) - solver.claimed_order) <= 0.3, (name, errs)


def test_reference_matches_closed_form_gaussian_flow() -> None:
    """The reference integrator itself, against the exact flow of a single Gaussian."""
    sched = dp.DiscreteVPSchedule()
    g = dp.GaussianMixture(
        torch.tensor([[0.3, -0.2, 0.5]]),
        torch.tensor([[0.1, 0.4, 0.2]]),
        torch.ones(1),
        torch.zeros(1),
        1,
    )
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ks, ke = sched.knot(999.0), sched.knot(0.0)
    exact = g.flow(x, ks, ke)
    ref = dp.reference_solve(dp.MixtureDenoiser(g), x, ks, ke, sched)
    assert float((ref - exact).abs().max()) < 1e-8
    # and solvers converge to the closed form too
    grid = dp.make_grid(sched, 200, "logsnr", t_end=0.0, final="t_min")
    r = dp.solve(dp.MixtureDenoiser(g), x, grid, dp.get_solver("dpmpp_3m"))
    assert float((r.x - exact).abs().max()) < 1e-6


@pytest.mark.parametrize("solver_name", ["dpmpp_3m", "dpm_3m"])
def test_extrapolated_final_step_removes_the_denoising_bias(solver_name: str) -> None:
    """To sigma = 0 from a fixed t_min, plain denoising stalls at its O(sigma_min^2) bias;
    the sigma~^2 extrapolation cuts that floor by more than 10x (its own floor is the
    O(sigma_min^3) term). Exact answer: the ODE solution at sigma = 0."""
    sched = dp.DiscreteVPSchedule()
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=0)
    den = dp.MixtureDenoiser(mix)
    x_T = (
        torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        * sched.knot(999.0).sigma
    )
    tiny = sched.knot_at_lambda(-math.log(1e-4))
    exact = den(
        dp.reference_solve(den, x_T, sched.knot(999.0), tiny, sched, rtol=1e-11, atol=1e-13), tiny
    )
    errs: dict[str, list[float]] = {"denoise": [], "extrapolate": []}
    for n in (40, 80, 160):
        grid = dp.make_grid(sched, n, "logsnr", final="zero")
        for mode in errs:
            r = dp.solve(den, x_T, grid, dp.get_solver(solver_name), final_step=mode)  # type: ignore[arg-type]
            errs[mode].append(float((r.x - exact).abs().max()))
    assert errs["denoise"][-1] > 0.5 * errs["denoise"][0], errs  # the plain step's bias floor
    for e_ext, e_den in zip(errs["extrapolate"], errs["denoise"], strict=True):
        assert e_ext < 0.1 * e_den, errs
