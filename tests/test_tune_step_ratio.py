"""The step-ratio bound of dpmsolver.tune's fitted time steps: a multistep solver of order 2
or more is never given knots whose log-SNR step grows more than ``step_ratio`` x over the one
before it, neither by the dynamic programming nor by the refinement; first-order and
singlestep solvers are not bounded; the option is checked."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.recipe import Recipe
from dpmsolver.tune.pilot import _Counter, _pilot, _RowDenoiser
from dpmsolver.tune.steps import _oss_knots, _refine, _steep, _with_knots

from .test_tune import COND, FAST, NET, SD, Y, Z

pytest.importorskip("scipy")


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    den = _Counter(_RowDenoiser(NET, "eps", {"y": Y}, {"y": torch.full_like(Y, 3)}, 5.0, None))
    return _pilot(den, SD, Z, 1e-5, 4, 48, 16)


def _growth(lams: list[float]) -> float:
    h = [b - a for a, b in itertools.pairwise(lams) if math.isfinite(a)]
    return max(b / a for a, b in itertools.pairwise(h))


def test_steep_is_a_step_growing_more_than_the_ratio() -> None:
    assert not _steep([0.0, 1.0, 2.0, 5.0], 3.0)  # 3x: allowed
    assert _steep([0.0, 1.0, 2.0, 6.0], 3.0)
    assert not _steep([0.0, 1.0, 2.0, 6.0], None)
    assert not _steep([0.0, 4.0, 5.0], 3.0)  # shrinking steps are not bounded
    assert not _steep([-math.inf, 0.0, 0.1, 0.4], 3.0)  # the pure-noise start is no step


def test_steep_knots_are_refused_for_solvers_that_extrapolate(problem) -> None:  # type: ignore[no-untyped-def]
    start = float(SD.knot(SD.t_max).lam)
    # steps 0.2, 0.2, then 1.0 (5x the one before), then 0.2
    steep = [start + v for v in (0.0, 0.2, 0.4, 1.4, 1.6)]
    assert _steep(steep, 3.0) and not _steep(steep, 6.0)
    for name, options in [("dpmpp_multistep", {"order": 2}), ("unipc", {"order": 3})]:
        assert _with_knots(problem, Recipe(name, options), steep, 3.0) is None
        assert _with_knots(problem, Recipe(name, options), steep, 6.0) is not None
        assert _with_knots(problem, Recipe(name, options), steep, None) is not None
    # first order: nothing is extrapolated, so nothing is bounded
    assert _with_knots(problem, Recipe("ddim"), steep, 3.0) is not None


@pytest.mark.parametrize("ratio", [1.25, 1.5])
def test_fitted_knots_keep_the_bound(problem, ratio: float) -> None:  # type: ignore[no-untyped-def]
    base = Recipe("dpmpp_multistep", {"order": 2})
    free = _oss_knots(problem, base, 8, None)
    bounded = _oss_knots(problem, base, 8, ratio)
    assert free is not None and bounded is not None
    assert _growth(bounded) <= ratio + 1e-12
    # the bound is what changed the path: unbounded, the DP's knots grow faster here
    assert _growth(free) > ratio
    fitted = _refine(problem, base, 8, bounded, 12, problem.cal, ratio)
    assert fitted is not None and fitted.recipe.timesteps is not None
    lams = [SD.knot(t).lam for t in fitted.recipe.timesteps]
    assert _growth([float(v) for v in lams]) <= ratio * (1 + 1e-6)


def test_the_option_is_checked_and_reaches_tune() -> None:
    with pytest.raises(ValueError, match="step_ratio must be >= 1"):
        dp.tune(NET, Z, schedule=SD, step_ratio=0.5)
    with pytest.raises(ValueError, match="step_ratio"):
        dp.tune(NET, Z, schedule=SD, step_ratio=math.inf)
    p = dp.tune(NET, Z, schedule=SD, guidance_scale=5.0, nfe=[8], step_ratio=1.5, **COND, **FAST)
    (c,) = p.choices
    if c.recipe.timesteps is not None and c.recipe.solver != "ddim":
        lams = [float(SD.knot(t).lam) for t in c.recipe.timesteps]
        assert _growth(lams) <= 1.5 * (1 + 1e-6)
