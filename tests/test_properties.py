"""Property-based tests (hypothesis) over schedules, time grids, solvers, orders and step
counts, on the exact Gaussian-mixture model:

- valid input never yields NaN/Inf;
- invalid input (steps, nfe, orders, grids, time ranges, names) always raises a
  ValueError/TypeError that names the offending parameter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dpmsolver as dp
from dpmsolver.solvers import ALIASES, REGISTRY, AdaptiveSolver

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCHEDULES: dict[str, Callable[[], dp.NoiseSchedule]] = {
    "discrete linear": lambda: dp.DiscreteVPSchedule(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02
    ),
    "discrete scaled_linear": lambda: dp.DiscreteVPSchedule(),
    "discrete squaredcos_cap_v2": lambda: dp.DiscreteVPSchedule(beta_schedule="squaredcos_cap_v2"),
    "discrete zero terminal SNR": lambda: dp.DiscreteVPSchedule(rescale_zero_terminal_snr=True),
    "vp linear": lambda: dp.ContinuousVPSchedule("linear"),
    "vp cosine": lambda: dp.ContinuousVPSchedule("cosine"),
    "ve": lambda: dp.VESchedule(0.01, 50.0),
    "edm": lambda: dp.VESchedule(),
    "flow": lambda: dp.RectifiedFlowSchedule(),
    "flow shift 3": lambda: dp.RectifiedFlowSchedule(3.0),
}
BUILT = {name: make() for name, make in SCHEDULES.items()}
MIX = dp.default_mixture(dim=6, num_classes=3, components_per_class=2, seed=4)
# Fixed-step deterministic solvers; the adaptive ones choose their own steps (tested in
# test_sampling), the stochastic ones need a noise source (test_sde).
DETERMINISTIC = sorted(
    name
    for name, info in REGISTRY.items()
    if info.default_order
    and not info.build(order=info.default_order).stochastic
    and not isinstance(info.build(order=info.default_order), AdaptiveSolver)
)


@st.composite
def valid_runs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid ``dp.sample`` call: any schedule, grid, solver, order, steps and range."""
    sched_name = draw(st.sampled_from(sorted(SCHEDULES)))
    sched = BUILT[sched_name]
    solver = draw(st.sampled_from(DETERMINISTIC))
    order = draw(st.sampled_from(REGISTRY[solver].orders))
    grid = draw(st.sampled_from(dp.GRID_KINDS))
    lo, hi = sched.t_min, sched.t_max
    start_frac = draw(st.floats(0.3, 1.0))
    end_frac = draw(st.floats(0.0, 0.25))
    t_start = lo + start_frac * (hi - lo)
    t_end = lo + end_frac * (hi - lo)
    if math.isinf(sched.knot(t_start).lam) and grid not in ("time_uniform", "time_quadratic"):
        t_start = lo + 0.99 * (hi - lo)  # grids spaced in noise level cannot start at pure noise
    return {
        "schedule": sched,
        "schedule_name": sched_name,
        "solver": solver,
        "order": order,
        "steps": draw(st.integers(1, 12)),
        "grid": grid,
        "t_start": t_start,
        "t_end": t_end,
        "final": draw(st.sampled_from(["zero", "t_min"])),
        "prediction": draw(st.sampled_from(dp.PREDICTIONS)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@SETTINGS
@given(valid_runs())
def test_valid_input_never_yields_nan_or_inf(run: dict[str, Any]) -> None:
    sched, pred = run["schedule"], run["prediction"]
    net = dp.MixtureNetwork(MIX, sched, pred)
    noise = torch.randn(
        3, MIX.dim, generator=torch.Generator().manual_seed(run["seed"]), dtype=run["dtype"]
    )
    res = dp.sample(
        net,
        noise,
        schedule=sched,
        prediction=pred,
        steps=run["steps"],
        grid=run["grid"],
        solver=dp.Recipe(
            run["solver"],
            {"order": run["order"]},
            t_start=run["t_start"],
            t_end=run["t_end"],
            final=run["final"],
        ),
    )
    assert torch.isfinite(res.x).all(), run
    assert res.x.dtype == run["dtype"] and res.x.shape == noise.shape


SD = dp.DiscreteVPSchedule()
NET = dp.MixtureNetwork(MIX, SD)
Z = torch.randn(2, MIX.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
NAME_CHARS = st.characters(min_codepoint=33, max_codepoint=126)


def raises_naming(param: str, **kwargs: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        dp.sample(NET, Z, schedule=SD, **kwargs)
    assert param in str(info.value), (param, str(info.value))


@SETTINGS
@given(
    st.one_of(
        st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)
    )
)
def test_bad_steps_are_named(steps: Any) -> None:
    raises_naming("steps", steps=steps)


@SETTINGS
@given(st.one_of(st.integers(max_value=0), st.floats(), st.booleans()))
def test_bad_nfe_is_named(nfe: Any) -> None:
    raises_naming("nfe", nfe=nfe)


@SETTINGS
@given(st.sampled_from(sorted(REGISTRY)), st.integers(-3, 9))
def test_orders_a_solver_lacks_are_named(solver: str, order: int) -> None:
    if order in REGISTRY[solver].orders:
        return
    raises_naming("order", solver=solver, order=order)


@SETTINGS
@given(st.text(NAME_CHARS, min_size=1, max_size=12))
def test_unknown_names_are_named(name: str) -> None:
    if name not in REGISTRY and name not in ALIASES and name != "auto":
        raises_naming("solver", solver=name, steps=4)
    if name not in dp.GRID_KINDS:
        raises_naming("grid", grid=name, steps=4)
    if name not in dp.PREDICTIONS:
        raises_naming("prediction", prediction=name, steps=4)


@SETTINGS
@given(
    st.sampled_from(sorted(SCHEDULES)),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
)
def test_time_ranges_outside_the_schedule_are_named(sched_name: str, t: float, frac: float) -> None:
    """A start outside [t_min, t_max] (or NaN/inf), or an end at or above the start."""
    sched = BUILT[sched_name]
    net = dp.MixtureNetwork(MIX, sched)
    lo, hi = sched.t_min, sched.t_max
    tol = 1e-6 * max(1.0, abs(hi))
    if not math.isfinite(t) or t < lo - tol or t > hi + tol:
        with pytest.raises((ValueError, TypeError), match="t_start"):
            dp.sample(
                net,
                Z,
                schedule=sched,
                steps=4,
                grid="time_uniform",
                solver=dp.Recipe("dpmpp_2m", t_start=t),
            )
        with pytest.raises((ValueError, TypeError), match="t_end"):
            dp.sample(
                net,
                Z,
                schedule=sched,
                steps=4,
                grid="time_uniform",
                solver=dp.Recipe("dpmpp_2m", t_end=t),
            )
    start = lo + frac * (hi - lo)
    with pytest.raises(ValueError, match=r"t_start=.* must be greater than t_end"):
        dp.sample(
            net,
            Z,
            schedule=sched,
            steps=4,
            grid="time_uniform",
            solver=dp.Recipe("dpmpp_2m", t_start=start, t_end=start),
        )


@SETTINGS
@given(st.lists(st.floats(0.0, 999.0), min_size=2, max_size=6))
def test_custom_grids_are_monotone_or_refused(ts: list[float]) -> None:
    """Decreasing timesteps sample finitely; a list that repeats a time or turns back is
    refused with a clear message (so are decreasing times closer than the schedule
    resolves, e.g. 1e-85 and 0)."""
    gaps = [a - b for a, b in itertools.pairwise(ts)]
    if all(g > 0 for g in gaps):
        try:
            res = dp.sample(NET, Z, schedule=SD, timesteps=ts, solver="dpmpp_2m")
        except ValueError as e:
            assert min(gaps) < 1e-3 and "strictly monotone" in str(e)
        else:
            assert torch.isfinite(res.x).all()
    elif not all(g < 0 for g in gaps):
        with pytest.raises(ValueError, match="strictly monotone"):
            dp.sample(NET, Z, schedule=SD, timesteps=ts, solver="dpmpp_2m")
