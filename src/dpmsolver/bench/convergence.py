"""Measured convergence order of every registered solver on an exact problem.

The measurements themselves (the exact problem, the runs, the slope and the SDE distances)
are :mod:`dpmsolver.orders`; this module turns them into the README's table.

Run ``python -m dpmsolver.bench.convergence [--out FILE]`` to regenerate the table in the
README (``benchmarks/orders.md``). tests/test_order.py asserts the same measurements.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..orders import ExactProblem, exact_problem, measure_order, sde_distance, slope
from ..schedules import DiscreteVPSchedule
from ..solvers import REGISTRY, configurations
from .records import write_text

__all__ = ["main", "order_rows", "to_markdown", "update_readme"]


def order_rows(problem: ExactProblem | None = None) -> list[dict[str, object]]:
    """One row per registered configuration: claimed and measured order, errors."""
    problem = problem or exact_problem(DiscreteVPSchedule(), 50.0)
    rows = []
    for name, cfg, solver in configurations():
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "order")
        row: dict[str, object] = dict(
            solver=name,
            order=cfg.get("order"),
            options=opts,
            description=REGISTRY[name].description,
        )
        if solver.stochastic:
            dist, floor = sde_distance(solver)
            row.update(
                claimed="SDE", measured=f"W2 {dist:.3f} (floor {floor:.3f})", nfe=[], error=[]
            )
        else:
            nfes, errs = measure_order(problem, solver)
            row.update(
                claimed=solver.claimed_order,
                measured=round(slope(nfes, errs), 2),
                nfe=nfes,
                error=errs,
            )
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
        lines.append(
            f"| `{r['solver']}` | {r['order']} | {r['options']} | {r['claimed']} | "
            f"{r['measured']} | {cells} |"
        )
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
    p = argparse.ArgumentParser(
        prog="python -m dpmsolver.bench.convergence", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", help="write the markdown table to this file")
    p.add_argument(
        "--readme",
        help="also replace the table between the order markers of this file (docs/solvers.md)",
    )
    args = p.parse_args(argv)
    md = to_markdown(order_rows())
    header = (
        "Measured convergence order (float64, exact Gaussian mixture, SD discrete schedule, "
        "t = 999 -> 50, logSNR steps; slope of -log(max error) vs log(NFE) over the three runs "
        "shown). Stochastic solvers: sliced 2-Wasserstein distance of 3000 samples (20 logSNR "
        "steps, exact start) to the exact marginal; the floor is the distance between two exact "
        "sample sets. Regenerate: `python -m dpmsolver.bench.convergence --out "
        "benchmarks/orders.md --readme docs/solvers.md`\n\n"
    )
    if args.out:
        write_text(args.out, header + md)
    if args.readme:
        update_readme(args.readme, md)
    sys.stdout.write(header + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
