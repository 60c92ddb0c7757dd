"""The benchmark suite: exact low-rank-plus-diagonal mixtures, references from pure noise,
the problems and their split, and the peer runner's evaluation counts."""

from __future__ import annotations

import math

import pytest
import torch

import dpmsolver as dp
from dpmsolver.analytic import (
    GaussianMixture,
    LowRankMixture,
    LowRankMixtureDenoiser,
    MixtureDenoiser,
    default_mixture,
    exact_sample,
    reference_sample,
    solve_from_pure_noise,
)

torch.set_num_threads(1)


def _random_lowrank(
    k: int, d: int, r: int, classes: int, seed: int, small: float = 0.01
) -> LowRankMixture:
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return LowRankMixture(
        torch.randn(k, d, generator=g, dtype=f64),
        0.7 * torch.randn(k, d, r, generator=g, dtype=f64),
        small + 0.2 * torch.rand(k, d, generator=g, dtype=f64),
        0.2 + torch.rand(k, generator=g, dtype=f64),
        torch.arange(k) % classes,
        classes,
    )


def _brute_force_x0(
    mix: LowRankMixture, x: torch.Tensor, a: float, s: float, cls: int | None
) -> torch.Tensor:
    """Tweedie's formula with the score from autograd of the exact log density of the
    noisy mixture (dense covariances, torch.distributions)."""
    cov = mix.covariances()
    eye = torch.eye(mix.dim, dtype=torch.float64)
    x = x.clone().requires_grad_(True)
    terms = []
    for k in range(mix.means.shape[0]):
        if cls is not None and int(mix.labels[k]) != cls:
            continue
        mvn = torch.distributions.MultivariateNormal(a * mix.means[k], a * a * cov[k] + s * s * eye)
        terms.append(torch.log(mix.weights[k]) + mvn.log_prob(x))
    (score,) = torch.autograd.grad(torch.logsumexp(torch.stack(terms), 0).sum(), x)
    return ((x + s * s * score) / a).detach()


@pytest.mark.parametrize(("a", "s"), [(0.95, 0.3), (0.2, 0.98), (1.0, 0.02), (0.5, 4.0)])
def test_lowrank_posterior_mean_equals_tweedie_with_autograd_score(a: float, s: float) -> None:
    mix = _random_lowrank(k=5, d=4, r=2, classes=3, seed=1)
    x = a * mix.sample(6, generator=torch.Generator().manual_seed(2)) + s * torch.randn(
        6, 4, dtype=torch.float64
    )
    for cls in (None, 0, 2):
        y = None if cls is None else torch.full((6,), cls)
        got = mix.x0(x, a, s, y)
        want = _brute_force_x0(mix, x, a, s, cls)
        assert torch.allclose(got, want, rtol=0, atol=1e-11 * (1 + float(want.abs().max())))


def test_lowrank_guided_denoiser_is_exact_cfg_with_per_row_labels() -> None:
    mix = _random_lowrank(k=6, d=5, r=3, classes=3, seed=3)
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0])  # 3 = unconditional rows
    knot = dp.DiscreteVPSchedule().knot(400.0)
    got = LowRankMixtureDenoiser(mix, y, 7.5)(x, knot)
    for i in range(9):
        cls = None if int(y[i]) == 3 else int(y[i])
        c = _brute_force_x0(mix, x[i : i + 1], knot.alpha, knot.sigma, cls)
        u = _brute_force_x0(mix, x[i : i + 1], knot.alpha, knot.sigma, None)
        assert torch.allclose(got[i : i + 1], u + 7.5 * (c - u), atol=1e-10)


def test_lowrank_with_zero_factors_equals_the_diagonal_mixture() -> None:
    diag = default_mixture(dim=16, num_classes=4, components_per_class=3, seed=0)
    lr = LowRankMixture.from_diagonal(diag)
    y = torch.arange(32) % 5
    z = torch.randn(32, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (999.0, 500.0, 50.0, 0.0):
        k = dp.DiscreteVPSchedule().knot(t)
        x = k.sigma * z + k.alpha * diag.sample(32, generator=torch.Generator().manual_seed(1))
        want = MixtureDenoiser(diag, y, 3.0)(x, k)
        got = LowRankMixtureDenoiser(lr, y, 3.0)(x, k)
        assert torch.allclose(got, want, rtol=0, atol=1e-13)
        assert torch.allclose(
            lr.log_prob(x, k.alpha, k.sigma), diag.log_prob(x, k.alpha, k.sigma), atol=1e-10
        )
    assert math.isclose(
        lr.data_std() ** 2,
        float(
            diag.stds.pow(2).mean(1) @ diag.weights
            + (diag.weights @ (diag.means - diag.weights @ diag.means) ** 2).mean()
        ),
        rel_tol=1e-12,
    )


def test_lowrank_per_row_noise_levels_and_sample_moments() -> None:
    mix = _random_lowrank(k=3, d=4, r=1, classes=2, seed=4)
    x = torch.randn(4, 4, dtype=torch.float64)
    al = torch.tensor([0.9, 0.5, 0.9, 0.5], dtype=torch.float64)
    sg = (1 - al**2).sqrt()
    rows = mix.x0(x, al, sg)
    for i in range(4):
        assert torch.allclose(
            rows[i], mix.x0(x[i : i + 1], float(al[i]), float(sg[i]))[0], atol=1e-14
        )
    one = LowRankMixture(
        mix.means[:1],
        mix.factors[:1],
        mix.diag[:1],
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        1,
    )
    xs = one.sample(40000, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(torch.cov(xs.T), one.covariances()[0], atol=0.05)


def test_solve_from_pure_noise_matches_the_closed_form_flow_of_one_gaussian() -> None:
    g = torch.Generator().manual_seed(0)
    mix = GaussianMixture(
        torch.randn(1, 6, generator=g, dtype=torch.float64),
        0.3 + torch.rand(1, 6, generator=g, dtype=torch.float64),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        1,
    )
    sched = dp.RectifiedFlowSchedule(3.0)
    start, end = sched.knot(sched.t_max), sched.knot(sched.t_min)
    assert start.alpha == 0.0 and start.lam == -math.inf
    with pytest.raises(ValueError, match="finite"):
        dp.reference_solve(MixtureDenoiser(mix), torch.zeros(1, 6), start, end, sched)
    z = torch.randn(8, 6, generator=g, dtype=torch.float64)
    got = solve_from_pure_noise(MixtureDenoiser(mix), z, start, end, sched, rtol=1e-9, atol=1e-11)
    exact = (
        end.alpha * mix.means[0] + torch.sqrt(end.alpha**2 * mix.stds[0] ** 2 + end.sigma**2) * z
    )
    assert float((got - exact).abs().max()) < 1e-9


def test_exact_sample_is_reference_sample_where_that_applies() -> None:
    mix = default_mixture(dim=4, seed=2)
    den = MixtureDenoiser(mix, torch.arange(4) % 3, 3.0)
    sched = dp.ContinuousVPSchedule("cosine")
    x = torch.randn(4, 4, dtype=torch.float64)
    assert torch.equal(
        exact_sample(den, x, sched, rtol=1e-6), reference_sample(den, x, sched, rtol=1e-6)
    )
