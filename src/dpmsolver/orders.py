"""Measuring a solver on exact problems: convergence orders and SDE distribution distances.

The claims every registered solver makes are checked here, on problems whose answer is
known: a class-labelled Gaussian mixture, whose probability-flow ODE is solved to local
tolerance 1e-12 by :func:`dpmsolver.analytic.reference_solve`, in float64. The measured
order is the least-squares slope of -log(max error) against log(NFE) over three runs
(:func:`measure_order`, :func:`slope`). Stochastic solvers have no pathwise order to
measure against the ODE: they are checked by the sliced 2-Wasserstein distance of their
end samples to exact samples of the marginal (:func:`sde_distance`). tests/test_order.py and
tests/test_sde.py assert these measurements for every registered configuration, and
``python -m dpmsolver.bench.convergence`` writes them as the README's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .analytic import GaussianMixture, MixtureDenoiser, default_mixture, reference_solve
from .loop import SampleResult, solve
from .noise import SeededNoise
from .schedules import DiscreteVPSchedule, Knot, NoiseSchedule
from .solvers import AdaptiveDPMSolver, FastDPMSolver, MultistepSolver, Solver
from .timegrid import make_grid

__all__ = [
    "SDE_MIXTURE",
    "SDE_SAMPLES",
    "ExactProblem",
    "exact_problem",
    "marginal_samples",
    "measure_order",
    "run_fixed",
    "sde_distance",
    "sde_end_samples",
    "sliced_w2",
    "slope",
]


@dataclass(frozen=True)
class ExactProblem:
    """A problem with a known answer: denoiser, start state and the exact end state."""

    schedule: NoiseSchedule
    denoiser: MixtureDenoiser
    x_start: torch.Tensor
    t_end: float
    reference: torch.Tensor


def exact_problem(
    schedule: NoiseSchedule, t_end: float, *, batch: int = 16, guidance: float = 1.0, seed: int = 0
) -> ExactProblem:
    """The exact Gaussian-mixture problem on ``schedule`` from ``t_max`` to ``t_end``
    (class-conditional with classifier-free guidance ``guidance`` if it is not 1)."""
    mix = default_mixture(dim=4, num_classes=2, components_per_class=2, seed=0)
    noise = torch.randn(
        batch, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    y = torch.arange(batch) % 2 if guidance != 1.0 else None
    den = MixtureDenoiser(mix, y=y, guidance_scale=guidance)
    ks, ke = schedule.knot(schedule.t_max), schedule.knot(t_end)
    x_start = noise * ks.sigma
    ref = reference_solve(den, x_start, ks, ke, schedule, rtol=1e-12, atol=1e-14)
    return ExactProblem(schedule, den, x_start, t_end, ref)


def slope(nfes: Sequence[int], errs: Sequence[float]) -> float:
    """Least-squares slope of -log(err) against log(nfe): the measured order."""
    xs = [math.log(n) for n in nfes]
    ys = [-math.log(e) for e in errs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def run_fixed(problem: ExactProblem, solver: Solver, n: int) -> SampleResult:
    """``n`` logSNR steps to ``t_end``, no lower-order final steps. Fast solvers get the
    budget ``3n - 1`` (order 3) or ``2n`` (order 2), whose order mix never ends in a
    first-order step (one such step caps the global order at 2)."""
    if isinstance(solver, FastDPMSolver):
        nfe = 3 * n - 1 if solver.order == 3 else 2 * n
        orders = solver.plan(steps=None, nfe=nfe, final_zero=False, lower_order_final=False)
    else:
        orders = solver.plan(steps=n, nfe=None, final_zero=False, lower_order_final=False)
    grid = make_grid(problem.schedule, len(orders), "logsnr", t_end=problem.t_end, final="t_min")
    return solve(problem.denoiser, problem.x_start, grid, solver, orders=orders)


def measure_order(
    problem: ExactProblem, solver: Solver, *, finer: int = 1
) -> tuple[list[int], list[float]]:
    """(NFE, max error) at three resolutions: 80/160/320 steps for multistep, 40/80/160 for
    singlestep (times ``finer``); adaptive solvers at three tolerances."""
    results: list[SampleResult] = []
    if isinstance(solver, AdaptiveDPMSolver):
        tols = [1e-2, 1e-3, 1e-4] if solver.order == 2 else [1e-3, 1e-4, 1e-5]
        grid = make_grid(problem.schedule, 1, "logsnr", t_end=problem.t_end, final="t_min")
        for tol in tols:
            results.append(
                solve(
                    problem.denoiser,
                    problem.x_start,
                    grid,
                    replace(solver, rtol=tol, atol=tol * 1e-2),
                )
            )
    else:
        ns = [80, 160, 320] if isinstance(solver, MultistepSolver) else [40, 80, 160]
        results = [run_fixed(problem, solver, n * finer) for n in ns]
    return [r.nfe for r in results], [float((r.x - problem.reference).abs().max()) for r in results]


# ----------------------------------------------------------------------------------------
# Stochastic solvers: distribution distance instead of an order
# ----------------------------------------------------------------------------------------

SDE_MIXTURE = GaussianMixture(
    means=torch.tensor([[-0.6, 0.4], [0.5, 0.5], [0.0, -0.6]]),
    stds=torch.tensor([[0.15, 0.1], [0.1, 0.2], [0.2, 0.1]]),
    weights=torch.tensor([0.3, 0.3, 0.4]),
    labels=torch.tensor([0, 1, 1]),
    num_classes=2,
)
SDE_SAMPLES = 3000


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (fixed projections)."""
    g = torch.Generator().manual_seed(123)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a.double() @ dirs, dim=0)
    pb, _ = torch.sort(b.double() @ dirs, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def marginal_samples(seed: int, knot: Knot | None = None) -> torch.Tensor:
    """Exact samples of :data:`SDE_MIXTURE`'s marginal at ``knot`` (the data if None)."""
    g = torch.Generator().manual_seed(seed)
    x0 = SDE_MIXTURE.sample(SDE_SAMPLES, generator=g)
    if knot is None:
        return x0
    return knot.alpha * x0 + knot.sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)


def sde_end_samples(
    solver: Solver, steps: int = 20, *, noise_scale: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Run ``solver`` from exact samples of the marginal at t = 999 to t = 0 (log-SNR steps,
    no final denoising), so the exact answer is the marginal at t = 0 and any distance
    beyond sampling noise is the solver's. ``noise_scale`` mis-scales the injected noise
    (for negative controls)."""
    sched = DiscreteVPSchedule()
    grid = make_grid(sched, steps, "logsnr", final="t_min")
    base = SeededNoise(list(range(seed * SDE_SAMPLES, (seed + 1) * SDE_SAMPLES)))

    def noise(x: torch.Tensor, s: Knot, t: Knot) -> torch.Tensor:
        return noise_scale * base(x)

    x_start = marginal_samples(10 + seed, grid.knots[0])
    return solve(MixtureDenoiser(SDE_MIXTURE), x_start, grid, solver, noise_sampler=noise).x


def sde_distance(solver: Solver, **kwargs: float) -> tuple[float, float]:
    """``(distance to the exact t = 0 marginal, resolution)``: the resolution is the distance
    between two independent exact sample sets of the same size."""
    target = marginal_samples(3, DiscreteVPSchedule().knot(0.0))
    floor = sliced_w2(
        marginal_samples(1, DiscreteVPSchedule().knot(0.0)),
        marginal_samples(2, DiscreteVPSchedule().knot(0.0)),
    )
    return sliced_w2(sde_end_samples(solver, **kwargs), target), floor  # type: ignore[arg-type]
