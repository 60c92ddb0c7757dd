"""Stage (g), the correction of the data prediction in the trajectory's principal directions
(:mod:`dpmsolver.correction`, PAS): the basis, the loop applying it at each step's start,
the least-squares fit recovering known coordinates, ``tune`` keeping it only where the
held-out half improves, and the profile, ``sample`` and the diffusers scheduler running it
as tuned, while the k-diffusion sigmas warn that they cannot."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

import dpmsolver as dp
from dpmsolver.correction import Correction, CorrectionFit, check_correction, trajectory_basis
from dpmsolver.loop import solve
from dpmsolver.tune import TuneOptions

from .test_compensation import (
    ARGS,
    DDIM,
    kept_where_held_out_takes_it,
    late_stage_profile,
    sample_and_scheduler_agree,
)
from .test_tune import NET, SD, Z

pytest.importorskip("scipy")


def test_the_basis_is_the_prediction_then_orthonormal_directions_of_the_trajectory() -> None:
    g = torch.Generator().manual_seed(3)
    start, d0, x0 = (torch.randn(5, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    u = trajectory_basis(x0, [start, d0], 4)
    assert u.shape == (5, 4, 8)
    flat = x0.reshape(5, -1)
    assert torch.allclose(u[:, 0], flat / flat.norm(dim=1, keepdim=True))
    # three vectors span three directions: the fourth is zero, the rest orthonormal
    assert float(u[:, 3].abs().max()) == 0.0
    gram = u[:, :3] @ u[:, :3].transpose(1, 2)
    assert torch.allclose(gram, torch.eye(3, dtype=gram.dtype).expand_as(gram), atol=1e-10)
    # every direction lies in the span of the start, the history and the prediction
    span = torch.stack([start.reshape(5, -1), d0.reshape(5, -1), flat], 2)
    q, _ = torch.linalg.qr(span)
    residual = u - (u @ q) @ q.transpose(1, 2)
    assert float(residual.abs().max()) < 1e-10
    # the sign comes from the data, not the eigensolver
    ref = flat - start.reshape(5, -1)
    assert bool(((u[:, 1:3] * ref.unsqueeze(1)).sum(2) >= 0).all())


def _ddim_by_hand(z: torch.Tensor, coords: list[list[float]], nfe: int) -> torch.Tensor:
    """DDIM (data form) on the log-SNR grid with the corrected predictions, written out."""
    knots = dp.make_grid(SD, nfe, "logsnr").knots
    x = z * knots[0].sigma
    history = [x]
    for k, (s, t) in enumerate(itertools.pairwise(knots)):
        d0 = (x - s.sigma * NET(x, torch.tensor(s.model_t))) / s.alpha  # eps network
        u = trajectory_basis(d0, history, len(coords[k]))
        size = d0.reshape(len(d0), -1).norm(dim=1) / d0[0].numel() ** 0.5
        c = torch.tensor(coords[k], dtype=u.dtype)
        use = d0 + size.view(-1, 1) * torch.einsum("bmd,m->bd", u, c)
        history.append(use)
        if t.sigma == 0:
            x = use
        else:
            x = t.sigma / s.sigma * x + t.alpha * (1 - t.sigma / s.sigma * s.alpha / t.alpha) * use
    return x


def test_the_loop_feeds_the_solver_the_corrected_prediction() -> None:
    z, nfe = Z[:4], 5
    coords = [[0.02, -0.01], [0.01, 0.03], [-0.02, 0.01], [0.0, 0.02], [0.01, -0.01]]
    recipe = dp.Recipe("ddim", grid="logsnr", correction=tuple(map(tuple, coords)))
    got = dp.sample(NET, z, schedule=SD, prediction="eps", solver=recipe, nfe=nfe).x
    want = _ddim_by_hand(z, coords, nfe)
    assert torch.allclose(got, want, atol=1e-6, rtol=0)  # the network's time in float32
    plain = dp.sample(NET, z, schedule=SD, prediction="eps", solver="ddim", grid="logsnr", nfe=nfe)
    assert float((got - plain.x).abs().max()) > 1e-3  # the coordinates move the samples
    zeros = dataclasses.replace(recipe, correction=((0.0, 0.0),) * 5)
    same = dp.sample(NET, z, schedule=SD, prediction="eps", solver=zeros, nfe=nfe).x
    assert torch.equal(same, plain.x)  # no coordinate, the plain solver bit for bit


def test_the_fit_recovers_coordinates_it_can_reach() -> None:
    """Targets made by a run with known coordinates: each step's end is affine in them, so
    the step-by-step least squares finds them again (up to its small ridge)."""
    den = dp.build_denoiser(NET, "eps")
    plan = dp.Recipe("dpmpp_2m", grid="logsnr").plan(SD, nfe=6)
    x_T = Z[:32] * plan.grid.knots[0].sigma
    # the first step's history (start, prediction) spans two directions: no third
    known = ((0.03, -0.02, 0.0), (0.02, 0.04, -0.01), (-0.03, 0.01, 0.02))
    known += ((0.01, -0.01, 0.03), (0.02, 0.0, -0.02), (-0.01, 0.02, 0.01))
    run = solve(den, x_T, plan, correction=known, return_intermediates=True)
    assert run.trajectory is not None
    fit = CorrectionFit(3, len(plan.steps), x_T, run.trajectory)
    again = solve(den, x_T, plan, correction=fit)
    assert torch.tensor(fit.fitted) == pytest.approx(torch.tensor(known), abs=2e-3)
    assert float((again.x - run.x).abs().max()) < 1e-3 * float(run.x.abs().max())
    plain = solve(den, x_T, plan)
    assert float((plain.x - run.x).abs().max()) > 1e-2 * float(run.x.abs().max())


def test_bad_coordinates_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"correction\[0\]\[1\]"):
        dp.Recipe("ddim", correction=((0.1, float("nan")),))
    with pytest.raises(ValueError, match="same number of coefficients"):
        dp.Recipe("ddim", correction=((0.1, 0.2), (0.1,)))
    with pytest.raises(TypeError, match="correction"):
        check_correction("0.1")  # type: ignore[arg-type]
    for recipe, message in (
        (dp.Recipe("ddim", correction=((0.1,), (0.2,))), r"one tuple of .* per step, i\.e\. 5"),
        (dp.Recipe("dpmpp_2m_sde", correction=((0.1,),) * 5), "correction needs a fixed plan"),
    ):
        with pytest.raises(ValueError, match=message):
            dp.sample(NET, Z[:2], schedule=SD, prediction="eps", nfe=5, solver=recipe)
    assert Correction([[0.5]], 1, Z[:1]).coefficients == ((0.5,),)
    for bad in (
        {"correction_components": -1},
        {"correction_components": 9},
        {"correction_rows": 0},
        {"correction_max_nfe": 0},
        {"correction_refine": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TuneOptions(**bad)  # type: ignore[arg-type]


def test_stage_g_is_kept_only_where_the_held_out_half_takes_it() -> None:
    # DDIM alone, as stage (f)'s test: the correction has most to add to a first-order solver;
    # "on" is tune's default since stop 46 (4 components), which this run checks
    assert TuneOptions().correction_components == 4
    default = {k: v for k, v in DDIM.items() if k != "correction_components"}
    on = dp.tune(NET, Z, **ARGS, **default)
    off = dp.tune(NET, Z, **ARGS, **{**DDIM, "correction_components": 0})
    for a in kept_where_held_out_takes_it(on, off, "correction"):
        steps = len(a.recipe.plan(SD, nfe=None if a.recipe.timesteps else a.nfe).steps)
        assert len(a.recipe.correction) == steps and {len(c) for c in a.recipe.correction} == {4}
    # only up to correction_max_nfe
    low = dp.tune(NET, Z, **ARGS, **{**DDIM, "correction_components": 4, "correction_max_nfe": 6})
    assert low.choice(8, 3.0).recipe.correction is None  # type: ignore[union-attr]


def _corrected(coords: tuple[tuple[float, ...], ...] | None) -> dp.Profile:
    return late_stage_profile(correction=coords)


COORDS = tuple((0.02 * (-1) ** k, 0.01 * k / 8, -0.01) for k in range(9))


def test_the_profile_samples_with_it_and_the_diffusers_scheduler_as_sample_does() -> None:
    sample_and_scheduler_agree(_corrected(None), _corrected(COORDS))


def test_the_k_diffusion_sigmas_warn_that_they_drop_it() -> None:
    corr = _corrected(COORDS)
    with pytest.warns(UserWarning, match="correction"):
        corr.sigmas(9, 1.0, SD)


def test_an_older_profile_reads_without_correction() -> None:
    data = _corrected(None).to_json()
    data["format"] = "dpmsolver-profile/7"
    for c in data["choices"]:
        del c["correction"]
    old = dp.Profile.from_json(data)
    assert old.choices[0].recipe.correction is None


class _FinalOnly:
    """What stage (g)'s refit reads of a pilot: the runs' final samples and the reference."""

    def __init__(self, plan: dp.Plan, x_T: torch.Tensor, reference: torch.Tensor) -> None:
        self.den = dp.build_denoiser(NET, "eps")
        self.plan, self.x_T, self.reference = plan, x_T, reference

    def run(self, recipe: dp.Recipe, nfe: int, rows: list[int]) -> torch.Tensor:
        return solve(self.den, self.x_T[rows], self.plan, correction=recipe.correction).x


def _refit_case(outlier: float) -> tuple[float, float, float]:
    """Final samples of a run with known coordinates, one row moved ``outlier`` away (a row
    sent to another mode); the refit from zero. The RMS errors to the known run's samples
    over the other rows: from zero, and after the refit; and the largest coordinate miss."""
    from dpmsolver.tune.stages import _refit_correction

    plan = dp.Recipe("dpmpp_2m", grid="logsnr").plan(SD, nfe=5)
    x_T = Z[:16] * plan.grid.knots[0].sigma
    known = tuple((0.03 * (-1) ** k, 0.02 * k / 4) for k in range(5))
    den = dp.build_denoiser(NET, "eps")
    target = solve(den, x_T, plan, correction=known).x
    reference = target.clone()
    reference[0] += outlier
    prob = _FinalOnly(plan, x_T, reference)
    start = dp.Recipe("dpmpp_2m", grid="logsnr", correction=((0.0, 0.0),) * 5)
    rows = list(range(16))
    got = _refit_correction(prob, start, 5, rows, 3)  # type: ignore[arg-type]
    assert got.correction is not None

    def rms(recipe: dp.Recipe) -> float:
        x = prob.run(recipe, 5, rows)
        return float((x[1:] - target[1:]).pow(2).mean().sqrt())

    miss = float((torch.tensor(got.correction) - torch.tensor(known)).abs().max())
    return rms(start), rms(got), miss


def test_the_refit_finds_coordinates_from_the_final_samples_alone() -> None:
    """S4S's objective: only the final samples are known, no intermediate state; Gauss-Newton
    from zero recovers the coordinates that made them."""
    before, after, miss = _refit_case(0.0)
    assert after < 0.01 * before and miss < 5e-3  # the final samples pin them less than states


def test_the_refit_is_not_steered_by_a_row_in_another_mode() -> None:
    """The row weights: a row far from its reference counts as one at twice the median row
    error, so the others still get their coordinates (unweighted, or Huber-weighted, that
    row pulls every coefficient towards itself)."""
    before, after, _ = _refit_case(float(Z[:16].std()) * 40.0)
    assert after < 0.1 * before


def test_stage_g2_refit_is_kept_only_where_the_held_out_half_takes_it() -> None:
    """Stage (g2) offers the refit after (g): a budget keeps the choice without it, or takes
    a correction that lowers the held-out error, on the same recipe otherwise."""
    assert TuneOptions().correction_refine == 0  # a study: refused as the default
    # every solver on the log-SNR grid: DDIM alone keeps (g)'s fit over the refit here
    opts = {k: v for k, v in DDIM.items() if k != "solvers"}
    on = dp.tune(NET, Z, **ARGS, **{**opts, "correction_components": 4, "correction_refine": 2})
    off = dp.tune(NET, Z, **ARGS, **{**opts, "correction_components": 4})
    kept = 0
    for a, b in zip(on.choices, off.choices, strict=True):
        if a.recipe.correction == b.recipe.correction:
            assert dataclasses.replace(a, seconds=b.seconds, evaluations=b.evaluations) == b
            continue
        kept += 1
        assert a.stage == "correction" and a.heldout_error < b.heldout_error
        assert a.recipe.correction is not None and {len(c) for c in a.recipe.correction} == {4}
        assert dataclasses.replace(a.recipe, correction=None) == dataclasses.replace(
            b.recipe, correction=None
        )
    assert kept
