"""The boundary probes of dpmsolver.tune: start states bisected towards the reference's mode
boundaries between held-out pilot noises, and the acceptance rule that reads them."""

from __future__ import annotations

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import exact_sample
from dpmsolver.recipe import Recipe
from dpmsolver.tune import TuneOptions
from dpmsolver.tune.acceptance import _accept
from dpmsolver.tune.pilot import _band, _Choice, _Counter, _pilot, _RowDenoiser

from .test_tune import NET, SD, Y, Z

pytest.importorskip("scipy")

N = Z.shape[0]
LEVELS = 6


@pytest.fixture(scope="module")
def problem():  # type: ignore[no-untyped-def]
    den = _Counter(_RowDenoiser(NET, "eps", {"y": Y}, {"y": torch.full_like(Y, 3)}, 5.0, None))
    return _pilot(den, SD, Z, 1e-5, 4, 0, 0, (4, LEVELS))


def test_probes_straddle_a_jump_of_the_reference(problem) -> None:  # type: ignore[no-untyped-def]
    pr = problem.probes
    assert pr is not None
    assert pr.pairs == N // 4  # 12 held-out rows, 6 pairs examined
    found = sorted(set(pr.pair))
    assert found and len(pr.pair) == LEVELS * len(found)
    # the probes' references are the exact samples from their states, under their rows'
    # conditioning (the held-out row a of each pair)
    rows = pr.rows
    den = dp.build_denoiser(
        NET,
        "eps",
        cond={"y": Y[rows]},
        uncond={"y": torch.full_like(Y[rows], 3)},
        guidance_scale=5.0,
    )
    again = exact_sample(den, pr.x_T, SD, rtol=1e-5)
    # (to the tolerance: the adaptive steps are shared by a batch, and these batches differ)
    torch.testing.assert_close(again, pr.reference, rtol=0, atol=1e-4)
    for i in found:
        mine = [k for k, p in enumerate(pr.pair) if p == i]
        dist = [pr.distance[k] for k in mine]
        # the last midpoint is half the final bracket from the boundary; none is farther
        # than half the arc
        assert dist[-1] == pytest.approx(pr.resolution / 2)
        assert all(0 < d <= 0.5 for d in dist)
        # a jump that bisecting did not shrink: a mode boundary
        assert pr.jump[i] > 0.05


def test_the_band_shrinks_as_the_solver_gets_accurate(problem) -> None:  # type: ignore[no-untyped-def]
    crude = _band(problem, Recipe("ddim"), 3)
    fine = _band(problem, Recipe("dpmpp_3m"), 50)
    assert crude > 0.0
    assert fine == 0.0
    assert _band(problem, Recipe("dpmpp_2m"), 10) < crude


def test_a_choice_that_sends_more_of_the_arcs_across_is_refused(problem) -> None:  # type: ignore[no-untyped-def]
    """Better on every held-out sample, but across the boundary on more of the probes'
    arcs than the current choice (by more than the finest probe): refused."""
    old = _Choice(Recipe("ddim"), "default", 1.0, torch.full((12,), 0.2), 8, band=0.01)
    slack = problem.probes.resolution / problem.probes.pairs
    better = torch.full((12,), 0.1)
    assert _accept(
        _Choice(Recipe("ddim"), "x", 0.5, better, 8, band=0.01 + slack), old, problem, TuneOptions()
    )
    assert not _accept(
        _Choice(Recipe("ddim"), "x", 0.5, better, 8, band=0.01 + 2 * slack),
        old,
        problem,
        TuneOptions(),
    )
    # without probes the band is not read
    bare = _pilot(problem.denoiser, SD, Z, 1e-5, 4, 0)
    assert bare.probes is None
    assert _accept(_Choice(Recipe("ddim"), "x", 0.5, better, 8, band=1.0), old, bare, TuneOptions())


def test_probe_options_are_checked() -> None:
    with pytest.raises(ValueError, match="probe_pairs must be >= 0"):
        dp.tune(NET, Z, schedule=SD, probe_pairs=-1)
    with pytest.raises(ValueError, match="probe_levels must be >= 1"):
        dp.tune(NET, Z, schedule=SD, probe_levels=0)
    assert TuneOptions().probe_pairs == 0  # off by default (a study that did not help)
