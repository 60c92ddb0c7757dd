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

from ..analytic import MixtureDenoiser, default_mixture, reference_solve
from ..sampling import SampleResult, solve
from ..schedules import DiscreteVPSchedule, NoiseSchedule
from ..solvers import REGISTRY, AdaptiveDPMSolver, FastDPMSolver, Solver, configurations
from ..timegrid import make_grid

__all__ = ["ExactProblem", "exact_problem", "measure_order", "order_rows", "run_fixed", "slope"]


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


def order_rows(problem: ExactProblem | None = None) -> list[dict[str, object]]:
    """One row per registered configuration: claimed and measured order, errors."""
    problem = problem or exact_problem(DiscreteVPSchedule(), 50.0)
    rows = []
    for name, cfg, solver in configurations():
        nfes, errs = measure_order(problem, solver)
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        rows.append(
            dict(
                solver=name,
                order=cfg.get("order"),
                options=opts,
                claimed=solver.claimed_order,
                measured=round(slope(nfes, errs), 2),
                nfe=nfes,
                error=errs,
                description=REGISTRY[name].description,
            )
        )
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    """The README table."""
    lines = [
        "| solver | order | options | claimed | measured | max error at NFE |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        errs = r["error"]
        nfes = r["nfe"]
        assert isinstance(errs, list) and isinstance(nfes, list)
        cells = ", ".join(f"{e:.1e} @ {n}" for n, e in zip(nfes, errs, strict=True))
        lines.append(f"| `{r['solver']}` | {r['order']} | {r['options']} | {r['claimed']} | {r['measured']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or write) the measured-order table."""
    p = argparse.ArgumentParser(prog="python -m dpmsolver.bench.convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown table to this file")
    args = p.parse_args(argv)
    md = to_markdown(order_rows())
    header = (
        "Measured convergence order (float64, exact Gaussian mixture, SD discrete schedule, "
        "t = 999 -> 50, logSNR steps). Regenerate: `python -m dpmsolver.bench.convergence --out benchmarks/orders.md`\n\n"
    )
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, header + md)
    sys.stdout.write(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
