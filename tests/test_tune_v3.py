"""DPM-Solver-v3 among stage (a)'s candidates (:attr:`~dpmsolver.tune.TuneOptions.v3_points`):
statistics estimated on the pilot's calibration trajectories, covering every grid the
candidates and the time-step search can use; the profile carrying them through its file;
the exact mixtures differentiable for the statistics' Jacobian products."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import LowRankMixture, LowRankMixtureDenoiser
from dpmsolver.ems import EMS
from dpmsolver.recipe import Recipe
from dpmsolver.sampling import SampleOptions
from dpmsolver.tune import (
    PROFILE_FORMAT,
    V3_CANDIDATES,
    Profile,
    TuneOptions,
    grid_families,
    v3_candidates,
)
from dpmsolver.tune.pilot import _Counter, _pilot, _RowDenoiser
from dpmsolver.tune.search import _model_statistics
from dpmsolver.tune.selection import _screened

from .test_tune import CHEAP, COND, MIX, SD, Z
from .test_tune_lower_order_final import one_choice_profile

FLOW = dp.RectifiedFlowSchedule()


def _lowrank(seed: int) -> LowRankMixture:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return LowRankMixture(
        torch.randn(3, 5, generator=g, dtype=f64),
        0.7 * torch.randn(3, 5, 2, generator=g, dtype=f64),
        0.05 + 0.2 * torch.rand(3, 5, generator=g, dtype=f64),
        0.2 + torch.rand(3, generator=g, dtype=f64),
        torch.arange(3) % 2,
        2,
    )


@pytest.mark.parametrize("bad", [-1, 3, 7])
def test_a_bad_v3_points_is_named(bad: int) -> None:
    assert TuneOptions().v3_points == 0  # a study, off by default (stage_a_v3.md)
    with pytest.raises(ValueError, match="v3_points"):
        TuneOptions(v3_points=bad)


def test_the_low_rank_mixture_is_differentiable_and_unchanged_by_it() -> None:
    mix = _lowrank(4)
    knot = SD.knot(0.6)
    y = torch.tensor([0, 1, 0, 1])
    den = LowRankMixtureDenoiser(mix, y, 3.0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = den(x, knot)
    xx = x.clone().requires_grad_(True)
    out = den(xx, knot)
    assert torch.equal(out.detach(), plain)  # the same arithmetic, out of place
    v = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (vjp,) = torch.autograd.grad(out, xx, v)
    # against central differences of v . D(x + e u) for each coordinate u
    eps = 1e-6
    fd = torch.zeros_like(x)
    for j in range(5):
        e = torch.zeros_like(x)
        e[:, j] = eps
        fd[:, j] = ((den(x + e, knot) - den(x - e, knot)) * v).sum(1) / (2 * eps)
    assert torch.allclose(vjp, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("schedule", [SD, FLOW], ids=["discrete-vp", "flow"])
def test_the_statistics_cover_every_candidate_grid(schedule: dp.NoiseSchedule) -> None:
    """On a schedule that starts at pure noise the statistics start below every finite
    knot a candidate grid or the dynamic programming uses; each v3 candidate then runs at
    every budget, and the network evaluations the statistics took are counted."""
    net = dp.MixtureNetwork(MIX, schedule, "x0")
    opts = TuneOptions(v3_points=16)
    rows = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 5.0, SampleOptions())
    prob = _pilot(_Counter(rows), schedule, Z, 1e-4, 4, opts.fine_knots)
    budgets = [5, 8, 12]
    ems, spent = _model_statistics(rows, prob, budgets, opts)
    assert isinstance(ems, EMS) and ems.lams.numel() == 16
    assert ems.guidance_scale == 5.0 and ems.samples == len(prob.cal)
    assert spent >= 16 * len(prob.cal)  # at least one call per grid point and row
    assert ems.lam_max == pytest.approx(schedule.knot(schedule.t_min).lam)
    for nfe in budgets:
        for kind, rho, sigma_max in grid_families(schedule, opts):
            knots = (
                Recipe("ddim", grid=kind, rho=rho, sigma_max=sigma_max)
                .plan(  # type: ignore[arg-type]
                    schedule, nfe=nfe
                )
                .grid.knots
            )
            assert ems.lam_min <= min(k.lam for k in knots if math.isfinite(k.lam))
    for name, options in v3_candidates(ems):
        assert name == "dpmv3" and options["ems"] is ems
        for nfe in budgets:
            x = prob.run(Recipe(name, options, grid="time_uniform"), nfe, prob.cal)
            assert x is not None and bool(torch.isfinite(x).all())
    assert len(v3_candidates(ems)) == len(V3_CANDIDATES)


def test_a_profile_carries_the_statistics_through_its_file(tmp_path: Path) -> None:
    net = dp.MixtureNetwork(MIX, SD, "x0")
    rows = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 5.0, SampleOptions())
    opts = TuneOptions(v3_points=16)
    ems, _ = _model_statistics(rows, _pilot(_Counter(rows), SD, Z, 1e-4, 4, 0), [6], opts)
    options = {"ems": ems, "order": 2, "corrector": "pseudo"}
    prof = one_choice_profile(SD, "x0", solver="dpmv3", options=options, nfe=6, guidance_scale=5.0)
    path = tmp_path / "p.json"
    prof.save(path)
    back = Profile.load(path)
    got = back.choices[0].recipe.options["ems"]
    assert isinstance(got, EMS) and got.fingerprint == ems.fingerprint
    for name in ("lams", "l", "s", "b"):
        assert torch.equal(getattr(got, name), getattr(ems, name))
    kw = dict(schedule=SD, prediction="x0", guidance_scale=5.0, solver="auto", nfe=6, **COND)
    a = dp.sample(net, Z, profile=prof, **kw)
    b = dp.sample(net, Z, profile=back, **kw)
    plain = dp.sample(net, Z, profile=one_choice_profile(SD, "x0", nfe=6, guidance_scale=5.0), **kw)
    assert torch.equal(a.x, b.x)
    assert float((a.x - plain.x).abs().max()) > 1e-4  # the statistics are used


def test_tune_with_v3_candidates_runs_every_stage_and_saves(tmp_path: Path) -> None:
    net = dp.MixtureNetwork(MIX, SD, "x0")
    kw = dict(schedule=SD, prediction="x0", guidance_scale=7.5, nfe=[5, 8], **COND, **CHEAP)
    on = dp.tune(net, Z, v3_points=16, **kw)
    off = dp.tune(net, Z, **kw)
    assert on.evaluations > off.evaluations  # the statistics' calls are counted
    path = tmp_path / "p.json"
    on.save(path)
    back = Profile.load(path)
    for c in on.choices:
        s = dict(schedule=SD, prediction="x0", guidance_scale=7.5, solver="auto", nfe=c.nfe, **COND)
        assert torch.equal(
            dp.sample(net, Z, profile=on, **s).x, dp.sample(net, Z, profile=back, **s).x
        )


def test_remembered_coefficients_give_the_same_samples() -> None:
    """dpmv3 keeps each step's coefficients on its EMS object: a second run with the same
    statistics, and a run with a fresh copy of them (nothing remembered), agree bit for bit."""
    ems = EMS.synthetic(lam_range=(-12.0, 12.0), points=64)
    net = dp.MixtureNetwork(MIX, SD, "x0")
    kw = dict(schedule=SD, prediction="x0", guidance_scale=3.0, nfe=7, **COND)
    recipe = Recipe("dpmv3", {"ems": ems, "order": 2, "corrector": "pseudo"})
    first = dp.sample(net, Z, solver=recipe, **kw).x
    assert ems.__dict__.get("_coefficients")  # remembered
    again = dp.sample(net, Z, solver=recipe, **kw).x
    fresh = EMS(ems.lams, ems.l, ems.s, ems.b, ems.fingerprint, ems.samples, ems.source)
    other = dp.sample(net, Z, solver=Recipe("dpmv3", {**recipe.options, "ems": fresh}), **kw).x
    assert torch.equal(first, again) and torch.equal(first, other)


def test_a_format_9_profile_still_reads() -> None:
    """Format 10 added the statistics inside a choice's options; a format 9 file has none."""
    prof = one_choice_profile(SD, "x0")
    data = prof.to_json()
    data["format"] = "dpmsolver-profile/9"
    old = Profile.from_json(json.loads(json.dumps(data)))
    assert old.choices == prof.choices and old.format == PROFILE_FORMAT


def test_the_statistics_respect_micro_batch() -> None:
    """With ``micro_batch`` the statistics' calls are split as tune's own are, and the
    estimate is the one taken in whole batches (the mixture is row-wise)."""
    net = dp.MixtureNetwork(MIX, SD, "x0")
    opts = TuneOptions(v3_points=16)
    whole = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 5.0, SampleOptions())
    split = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 5.0, SampleOptions(), 4)
    prob = _pilot(_Counter(whole), SD, Z, 1e-4, 4, 0)
    a, _ = _model_statistics(whole, prob, [6], opts)
    b, _ = _model_statistics(split, prob, [6], opts)
    for name in ("l", "s", "b"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "bad", [{"v3_noise": "calibration"}, {"v3_max_nfe": 0}, {"v3_min_guidance": math.inf}]
)
def test_a_bad_v3_scope_is_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        TuneOptions(**bad)


def test_statistics_from_noises_of_their_own_ignore_the_pilot_noise() -> None:
    """``v3_noise="own"``: the statistics come from noises of ``V3_SEED`` (the calibration
    rows' conditioning), so two pilots with the same labels and different noises get the
    same statistics, and they differ from the calibration rows' own."""
    net = dp.MixtureNetwork(MIX, SD, "x0")
    rows = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 5.0, SampleOptions())
    own, pilot = TuneOptions(v3_points=16, v3_noise="own"), TuneOptions(v3_points=16)
    other = torch.randn(Z.shape, generator=torch.Generator().manual_seed(77), dtype=Z.dtype)
    p1 = _pilot(_Counter(rows), SD, Z, 1e-4, 4, 0)
    p2 = _pilot(_Counter(rows), SD, other, 1e-4, 4, 0)
    a, _ = _model_statistics(rows, p1, [6], own)
    b, _ = _model_statistics(rows, p2, [6], own)
    c, _ = _model_statistics(rows, p1, [6], pilot)
    assert torch.equal(a.l, b.l) and torch.equal(a.b, b.b)
    assert float((a.b - c.b).abs().max()) > 1e-6


def test_v3_candidates_stay_within_their_guidance_and_budgets() -> None:
    """Below ``v3_min_guidance`` no statistics are taken (the profile costs what it costs
    without them); above ``v3_max_nfe`` no ``dpmv3`` candidate is screened."""
    net = dp.MixtureNetwork(MIX, SD, "x0")
    kw = dict(schedule=SD, prediction="x0", nfe=[5], **COND, **CHEAP)
    off = dp.tune(net, Z, guidance_scale=3.0, **kw)
    low = dp.tune(net, Z, guidance_scale=3.0, v3_points=16, v3_min_guidance=5.0, **kw)
    assert low.evaluations == off.evaluations
    untimed = [dataclasses.replace(c, seconds=0.0) for c in (*low.choices, *off.choices)]
    assert untimed[: len(low.choices)] == untimed[len(low.choices) :]
    rows = _RowDenoiser(net, "x0", COND["cond"], COND["uncond"], 7.5, SampleOptions())
    prob = _pilot(_Counter(rows), SD, Z, 1e-4, 4, 0)
    ems, _ = _model_statistics(rows, prob, [5, 8], TuneOptions(v3_points=16))
    opts = TuneOptions(solvers=(("ddim", {}), *v3_candidates(ems)), v3_max_nfe=6)
    assert any(r.solver == "dpmv3" for _, r in _screened(prob, 5, opts))
    assert {r.solver for _, r in _screened(prob, 8, opts)} == {"ddim"}


def test_the_bench_names_a_fitted_dpmv3_choice_whole() -> None:
    """The benchmark's recipe column cuts a fitted choice's text at its grid: the
    statistics' own bracket (``lambda [lo, hi]``) must not cut it short."""
    from dpmsolver.bench.tuned import _describe

    ems = EMS.synthetic(lam_range=(-12.0, 12.0), points=16)
    times = tuple(float(t) for t in torch.linspace(1.0, 1e-3, 7))
    prof = one_choice_profile(
        SD, "x0", solver="dpmv3", options={"ems": ems, "order": 2}, nfe=6, timesteps=times
    )
    _, text = _describe(prof, 6, 1.0)
    assert text == f"dpmv3 ems={ems!r} order=2 [fitted 7 knots]"
