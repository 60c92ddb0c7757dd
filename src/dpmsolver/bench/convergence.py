"""Measured convergence order of every registered solver on an exact problem.

Problem: a class-labelled Gaussian mixture (``default_mixture(dim=4, num_classes=2,
components_per_class=2)``) under Stable Diffusion's discrete schedule, integrated from
t = 999 to t = 50 in float64; the exact answer comes from
:func:`dpmsolver.analytic.reference_solve` at local tolerance 1e-12. The order is the
least-squares slope of -log(max error) against log(NFE) over the finest three runs.

Run ``python -m dpmsolver.bench.convergence [--out FILE]`` to regenerate the table in the
README (``benchmarks/orders.md``). tests/test_order.py asserts the same measurements.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..analytic import GaussianMixture, MixtureDenoiser, default_mixture, reference_solve
from ..noise import SeededNoise
from ..sampling import SampleResult, solve
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule
from ..solvers import REGISTRY, AdaptiveDPMSolver, FastDPMSolver, Solver, configurations
from ..timegrid import make_grid

__all__ = [
    "ExactProblem",
    "exact_problem",
    "marginal_samples",
    "measure_order",
    "order_rows",
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
    noise = torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
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
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


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


def measure_order(problem: ExactProblem, solver: Solver, *, finer: int = 1) -> tuple[list[int], list[float]]:
    """(NFE, max error) at three resolutions: 80/160/320 steps for multistep, 40/80/160 for
    singlestep (times ``finer``); adaptive solvers at three tolerances."""
    results: list[SampleResult] = []
    if isinstance(solver, AdaptiveDPMSolver):
        tols = [1e-2, 1e-3, 1e-4] if solver.order == 2 else [1e-3, 1e-4, 1e-5]
        grid = make_grid(problem.schedule, 1, "logsnr", t_end=problem.t_end, final="t_min")
        for tol in tols:
            results.append(solve(problem.denoiser, problem.x_start, grid, replace(solver, rtol=tol, atol=tol * 1e-2)))
    else:
        ns = [80, 160, 320] if solver.kind == "multistep" else [40, 80, 160]
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


def sde_end_samples(solver: Solver, steps: int = 20, *, noise_scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Run ``solver`` from exact samples of the marginal at t = 999 to t = 0 (log-SNR steps,
    no final denoising), so the exact answer is the marginal at t = 0 and any distance
    beyond sampling noise is the solver's. ``noise_scale`` mis-scales the injected noise
    (for negative controls)."""
    sched = DiscreteVPSchedule()
    grid = make_grid(sched, steps, "logsnr", final="t_min")
    base = SeededNoise(list(range(seed * SDE_SAMPLES, (seed + 1) * SDE_SAMPLES)))

    def noise(x: torch.Tensor) -> torch.Tensor:
        return noise_scale * base(x)

    x_start = marginal_samples(10 + seed, grid.knots[0])
    return solve(MixtureDenoiser(SDE_MIXTURE), x_start, grid, solver, noise_sampler=noise).x


def sde_distance(solver: Solver, **kwargs: float) -> tuple[float, float]:
    """``(distance to the exact t = 0 marginal, resolution)``: the resolution is the distance
    between two independent exact sample sets of the same size."""
    target = marginal_samples(3, DiscreteVPSchedule().knot(0.0))
    floor = sliced_w2(marginal_samples(1, DiscreteVPSchedule().knot(0.0)), marginal_samples(2, DiscreteVPSchedule().knot(0.0)))
    return sliced_w2(sde_end_samples(solver, **kwargs), target), floor  # type: ignore[arg-type]


def order_rows(problem: ExactProblem | None = None) -> list[dict[str, object]]:
    """One row per registered configuration: claimed and measured order, errors."""
    problem = problem or exact_problem(DiscreteVPSchedule(), 50.0)
    rows = []
    for name, cfg, solver in configurations():
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        row: dict[str, object] = dict(solver=name, order=cfg.get("order"), options=opts, description=REGISTRY[name].description)
        if solver.stochastic:
            dist, floor = sde_distance(solver)
            row.update(claimed="SDE", measured=f"W2 {dist:.3f} (floor {floor:.3f})", nfe=[], error=[])
        else:
            nfes, errs = measure_order(problem, solver)
            row.update(claimed=solver.claimed_order, measured=round(slope(nfes, errs), 2), nfe=nfes, error=errs)
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    """The README table."""
    lines = [
        "| solver | order | options | claimed | measured | max error @ NFE |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = r["error"]
        nfes = r["nfe"]
        assert isinstance(errs, list) and isinstance(nfes, list)
        cells = ", ".join(f"{e:.1e} @ {n}" for n, e in zip(nfes, errs, strict=True)) or "20 steps"
        lines.append(f"| `{r['solver']}` | {r['order']} | {r['options']} | {r['claimed']} | {r['measured']} | {cells} |")
    return "\n".join(lines) + "\n"


README_START = "<!-- orders:start -->"
README_END = "<!-- orders:end -->"


def update_readme(path: str, table: str) -> None:
    """Replace the table between the README's order markers."""
    text = open(path, encoding="utf-8").read()
    i, j = text.index(README_START), text.index(README_END)
    from ..io import atomic_write_text

    atomic_write_text(path, text[: i + len(README_START)] + "\n" + table + text[j:])


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or write) the measured-order table."""
    p = argparse.ArgumentParser(prog="python -m dpmsolver.bench.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown table to this file")
    p.add_argument("--readme", help="also replace the table between the README's order markers")
    args = p.parse_args(argv)
    md = to_markdown(order_rows())
    header = (
        "Measured convergence order (float64, exact Gaussian mixture, SD discrete schedule, "
        "t = 999 -> 50, logSNR steps; slope of -log(max error) vs log(NFE) over the three runs "
        "shown). Stochastic solvers: sliced 2-Wasserstein distance of 3000 samples (20 logSNR "
        "steps, exact start) to the exact marginal; the floor is the distance between two exact "
        "sample sets. Regenerate: `python -m dpmsolver.bench.convergence --out "
        "benchmarks/orders.md --readme README.md`\n\n"
    )
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, header + md)
    if args.readme:
        update_readme(args.readme, md)
    sys.stdout.write(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
