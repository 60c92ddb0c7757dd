"""Grids entered at a k-diffusion sigma (``make_grid(sigma_max=...)``, ``Recipe.sigma_max``)
and stage (a)'s flow candidates built on them (:attr:`~dpmsolver.tune.TuneOptions.flow_sigma_max`):
the knots, the recipe and profile carrying them, and which schedules see the candidates."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.tune import Profile, TuneOptions, grid_families

from .test_tune_lower_order_final import one_choice_profile

FLOW = dp.RectifiedFlowSchedule()
SD = dp.DiscreteVPSchedule()


def _ksigmas(grid: dp.TimeGrid) -> list[float]:
    return [k.ksigma for k in grid.knots[:-1]]  # the last is the clean knot


def test_the_spacing_starts_at_sigma_max_after_one_step_from_the_start() -> None:
    plain = dp.make_grid(FLOW, 8, "karras")
    entered = dp.make_grid(FLOW, 8, "karras", sigma_max=80.0)
    assert entered.knots[0] == plain.knots[0]  # the same start, a thousandth in
    ks = _ksigmas(entered)
    assert ks[0] > 900.0 and ks[1] == pytest.approx(80.0, rel=1e-9)
    # Karras spacing (rho 7) from 80 to the schedule's end
    roots = torch.tensor(ks[1:], dtype=torch.float64) ** (1 / 7)
    assert torch.allclose(roots.diff(), roots.diff()[0].expand(len(ks) - 2), rtol=1e-7)
    assert ks[-1] == pytest.approx(_ksigmas(plain)[-1], rel=1e-9)
    assert len(entered.knots) == len(plain.knots)
    # log-SNR spacing from 80 likewise
    lams = [k.lam for k in dp.make_grid(FLOW, 6, "logsnr", sigma_max=80.0).knots[1:-1]]
    assert lams[0] == pytest.approx(-math.log(80.0))
    steps = torch.tensor(lams).diff()
    assert torch.allclose(steps, steps[0].expand(len(steps)), rtol=1e-7)


def test_sigma_max_leaves_time_grids_and_quieter_starts_alone() -> None:
    for kind in ("time_uniform", "time_quadratic"):
        assert dp.make_grid(FLOW, 7, kind, sigma_max=80.0) == dp.make_grid(FLOW, 7, kind)
    # the discrete VP schedule starts at sigma~ 14.6: below 80 the spacing starts there
    assert dp.make_grid(SD, 7, "karras", sigma_max=80.0) == dp.make_grid(SD, 7, "karras")
    entered = dp.make_grid(SD, 7, "karras", sigma_max=5.0)
    assert _ksigmas(entered)[1] == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_a_bad_sigma_max_is_named(bad: float) -> None:
    for kind in ("karras", "time_uniform"):  # named whether or not the kind uses it
        with pytest.raises(ValueError, match="sigma_max"):
            dp.make_grid(FLOW, 6, kind, sigma_max=bad)
    with pytest.raises(ValueError, match="flow_sigma_max"):
        TuneOptions(flow_sigma_max=bad)


def test_a_recipe_plans_and_names_its_entered_grid() -> None:
    r = dp.Recipe("unipc", {"order": 2}, "karras", rho=7.0, sigma_max=80.0)
    plan = r.plan(FLOW, nfe=8)
    assert plan.grid == dp.make_grid(FLOW, len(plan.orders), "karras", rho=7.0, sigma_max=80.0)
    assert "sigma_max=80" in r.describe()


def test_the_entered_grids_are_candidates_only_where_the_schedule_starts_at_pure_noise() -> None:
    assert TuneOptions().flow_sigma_max is None  # a study, not adopted (stage_a_sigma_max.md)
    opts = TuneOptions(flow_sigma_max=80.0)
    plain = [(kind, rho, None) for kind, rho in opts.grids]
    flow = grid_families(FLOW, opts)
    assert flow[: len(plain)] == plain
    assert flow[len(plain) :] == [("logsnr", None, 80.0), ("karras", 7.0, 80.0)]
    assert grid_families(SD, opts) == plain
    assert grid_families(dp.VESchedule(), opts) == plain
    assert grid_families(FLOW, TuneOptions()) == plain


def _profile(sigma_max: float | None) -> Profile:
    return one_choice_profile(FLOW, "x0", grid="karras", rho=7.0, sigma_max=sigma_max)


def test_a_profile_keeps_sigma_max_through_its_file_and_samples_with_it(tmp_path: Path) -> None:
    mix = dp.default_mixture(dim=4, num_classes=2, components_per_class=2, seed=2)
    net = dp.MixtureNetwork(mix, FLOW, "x0")
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    prof = _profile(80.0)
    path = tmp_path / "p.json"
    prof.save(path)
    assert Profile.load(path) == prof
    got = dp.sample(net, z, schedule=FLOW, prediction="x0", solver="auto", nfe=8, profile=prof)
    want = dp.sample(net, z, schedule=FLOW, prediction="x0", solver=prof.choices[0].recipe, nfe=8)
    plain = dp.sample(
        net, z, schedule=FLOW, prediction="x0", solver="auto", nfe=8, profile=_profile(None)
    )
    assert torch.equal(got.x, want.x)
    assert float((got.x - plain.x).abs().max()) > 1e-4
    sig = prof.sigmas(8, 1.0, FLOW)
    assert sig[1] == pytest.approx(80.0, rel=1e-9) and sig[-1] == 0.0


def test_an_older_profile_reads_without_sigma_max() -> None:
    data = _profile(None).to_json()
    data["format"] = "dpmsolver-profile/8"
    for c in data["choices"]:
        del c["sigma_max"]
    old = Profile.from_json(json.loads(json.dumps(data)))
    assert old.choices[0].recipe.sigma_max is None
    assert dataclasses.replace(old, format=_profile(None).format) == _profile(None)
