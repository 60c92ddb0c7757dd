"""The step out of pure noise: on rectified flow the default grids start a thousandth below
``t = 1``, and the first evaluation carries the noise there (``x = sigma z + alpha x0_hat``),
so the sample converges to the ODE's solution from ``x_1 = z`` instead of stopping at the
floor the offset left (benchmarks/flow_entry.md)."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import GaussianMixture
from dpmsolver.loop import solve
from dpmsolver.sampling import _off_pure_noise
from dpmsolver.tune.pilot import _Counter, _pilot, _RowDenoiser

FLOW = dp.RectifiedFlowSchedule(3.0)
# one Gaussian far from the origin: the exact flow is closed form, and the old start's bias
# (a thousandth of the data's distance from the noise) is large beside the solver's error
_G = torch.Generator().manual_seed(4)
ONE = GaussianMixture(
    4.0 + torch.randn(1, 6, generator=_G, dtype=torch.float64),
    0.3 + torch.rand(1, 6, generator=_G, dtype=torch.float64),
    torch.ones(1),
    torch.zeros(1, dtype=torch.long),
    1,
)
NET = dp.MixtureNetwork(ONE, FLOW, "flow")
Z = torch.randn(16, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
# x_1 = z flows to x = alpha mean + sqrt(alpha^2 std^2 + sigma^2) z; the sample is the data
# prediction at t_min, as the suite's references end
_END = FLOW.knot(FLOW.t_min)
_S = ONE.stds[0]
EXACT = ONE.means[0] + _S * Z * (
    _END.alpha * _S / torch.sqrt(_END.alpha**2 * _S**2 + _END.sigma**2)
)
UNIPC3 = dp.Recipe("unipc", {"order": 3}, lower_order_final=True)


#: The exact flow from the noise all the way to the clean end (t = 0).
EXACT_END = ONE.means[0] + ONE.stds[0] * Z


def _rms(x: torch.Tensor, exact: torch.Tensor = EXACT) -> float:
    return float(((x - exact) ** 2).mean().sqrt())


_den = dp.MixtureDenoiser(ONE)


def test_the_default_flow_grid_starts_after_pure_noise_and_names_that_knot() -> None:
    plan = UNIPC3.plan(FLOW, nfe=10)
    entry = plan.grid.pure_noise_entry
    assert entry is not None and entry.alpha == 0.0 and entry.t == FLOW.t_max
    assert plan.grid.knots[0].t < FLOW.t_max
    # not where the grid starts at pure noise, on a schedule that does not start there, or
    # when inverting
    assert dp.Recipe("unipc", t_start=1.0).plan(FLOW, nfe=10).grid.pure_noise_entry is None
    assert dp.Recipe("unipc").plan(dp.DiscreteVPSchedule(), nfe=10).grid.pure_noise_entry is None
    to_t_min = dp.Recipe("unipc", final="t_min").plan(FLOW, nfe=10).grid
    assert to_t_min.pure_noise_entry is not None and to_t_min.reversed().pure_noise_entry is None


@pytest.mark.parametrize("steps", [40, 80])
def test_the_entry_step_removes_the_start_floor(steps: int) -> None:
    """Without the entry step the error stays near a thousandth of the data's distance
    from the noise at any budget; with it the solver converges."""
    plan = dp.Recipe("unipc", {"order": 3}, grid="logsnr").plan(FLOW, steps=steps)
    assert plan.grid.knots[-2].t == FLOW.t_min
    with_entry = _rms(solve(_den, Z, plan, start=plan.grid.pure_noise_entry).x)
    without = _rms(solve(_den, Z, plan).x)
    assert without > 1e-3
    assert with_entry < 0.15 * without, (with_entry, without)


def test_sample_takes_the_entry_step_on_its_default_grid_and_not_on_custom_ones() -> None:
    res = dp.sample(NET, Z, schedule=FLOW, prediction="flow", solver=UNIPC3, nfe=12)
    plan = UNIPC3.plan(FLOW, nfe=12)
    assert torch.allclose(
        res.x, solve(_den, Z, plan, start=plan.grid.pure_noise_entry).x, rtol=0, atol=1e-12
    )
    # a custom grid starts where it says, from the noise scaled by its first sigma
    times = plan.grid.times[:-1]
    custom = dp.sample(NET, Z, schedule=FLOW, prediction="flow", solver=UNIPC3, timesteps=times)
    first = plan.grid.knots[0]
    assert torch.allclose(custom.x, solve(_den, Z * first.sigma, plan).x, rtol=0, atol=1e-12)


def test_a_start_after_the_first_knot_is_refused() -> None:
    plan = UNIPC3.plan(FLOW, nfe=8)
    with pytest.raises(ValueError, match="start"):
        solve(_den, Z, plan, start=plan.grid.knots[1])
    # the first knot itself is no entry: the run is the plain one
    assert torch.equal(solve(_den, Z, plan, start=plan.grid.knots[0]).x, solve(_den, Z, plan).x)


def test_tune_runs_a_recipe_from_the_start_that_sample_takes() -> None:
    """The pilot's runs start as sample() does, so what tune scores is what sampling gives."""
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=3)
    net = dp.MixtureNetwork(mix, FLOW, "x0")
    z = torch.randn(8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.arange(8) % 2
    cond, uncond = {"y": y}, {"y": torch.full_like(y, 2)}
    problem = _pilot(
        _Counter(_RowDenoiser(net, "x0", cond, uncond, 3.0, None)), FLOW, z, 1e-6, 2, 0
    )
    assert problem.plan(UNIPC3, 10).grid.pure_noise_entry is not None  # type: ignore[union-attr]
    tuned = problem.run(UNIPC3, 10)
    sampled = dp.sample(
        net,
        z,
        schedule=FLOW,
        prediction="x0",
        solver=UNIPC3,
        nfe=10,
        guidance_scale=3.0,
        cond=cond,
        uncond=uncond,
    ).x
    assert tuned is not None and torch.allclose(tuned, sampled, rtol=0, atol=1e-10)


def test_a_noise_prediction_starts_a_step_in_from_sigma_times_the_noise() -> None:
    """With a noise prediction the grid starts one step below pure noise (a noise prediction
    says nothing about the data there), from ``sigma * noise``: carrying the noise there
    lowers the typical error but blew up strongly guided cells (benchmarks/flow_entry.md)."""
    eps_net = dp.MixtureNetwork(ONE, FLOW, "eps")
    res = dp.sample(eps_net, Z, schedule=FLOW, prediction="eps", solver=UNIPC3, nfe=20)
    shifted = _off_pure_noise(UNIPC3, FLOW, "eps", 20)
    plan = shifted.plan(FLOW, nfe=20)
    assert plan.grid.knots[0].t == pytest.approx(FLOW.t_max - (FLOW.t_max - FLOW.t_min) / 20)
    placed = solve(_den, Z * plan.grid.knots[0].sigma, plan).x
    assert torch.allclose(res.x, placed, rtol=0, atol=1e-9)
    # what carrying it would do here: the bias of alpha = 1/20 gone
    carried = solve(_den, Z, plan, start=plan.grid.pure_noise_entry).x
    ours, old = _rms(carried, EXACT_END), _rms(placed, EXACT_END)
    assert ours < 0.25 * old, (ours, old)
