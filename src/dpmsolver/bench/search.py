"""How ``solver="auto"`` was chosen: a search over our configurations, scored against the
best peer configuration in every (NFE, guidance) cell.

Candidates: our deterministic solvers x time grids x where to stop (the schedule's t_min,
or k-diffusion sigma 0.07 / 0.14), all ending with the data-prediction step. Each is
run on the exact mixture (:func:`~.accuracy.mixture_problem`) for noise seeds 0 and 1 and
scored by ``max over seeds of error / best peer error`` (so a configuration must beat every
peer on every seed to score below 1); the best eight per cell are then run on the built-in
digits network (seeds 0 and 1) and on a third mixture seed (3), and the recipe kept is the
one with the lowest worst ratio over all five. The README's tables come from :mod:`.run` on
held-out seeds (2).

Run ``python -m dpmsolver.bench.search --out benchmarks/auto_search.md`` (tens of minutes).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from ..auto import Recipe
from ..solvers import Form
from .accuracy import GuidedProblem, digits_problem, evaluate, mixture_problem, peer_methods, rmse
from .run import _run_recipe

__all__ = ["CANDIDATE_GRIDS", "CANDIDATE_SOLVERS", "candidates", "main", "score_cells"]

CANDIDATE_SOLVERS: list[tuple[str, dict[str, Any]]] = [
    ("ddim", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpm_2m", {}), ("dpm_3m", {}),
    ("unipc", {"order": 2}), ("unipc", {"order": 3}), ("unipc", {"order": 2, "variant": "bh1"}),
    ("unipc", {"order": 2, "form": Form.NOISE}), ("unipc", {"order": 3, "form": Form.NOISE}),
    ("deis", {"order": 2}), ("deis", {"order": 3}),
    ("lms", {"order": 3}), ("lms", {"order": 4}),
    ("ipndm", {"order": 4, "coefficients": "fixed"}), ("ipndm", {"order": 3, "coefficients": "fixed"}),
    ("dpmpp_fast", {}), ("dpm_fast", {}), ("dpmpp_2s", {}), ("heun", {}),
    ("ghvb", {"order": 2, "nu": 1.5}), ("dpmpp_2m_hb", {"beta": 0.8}),
]
CANDIDATE_GRIDS: list[tuple[str, float | None]] = [
    ("logsnr", None), ("karras", 7.0), ("polyexponential", 0.7), ("polyexponential", 1.5),
    ("time_uniform", None), ("time_quadratic", None),
]
SIGMA_ENDS: list[float | None] = [None, 0.07, 0.14]


def candidates() -> list[Recipe]:
    """Every recipe the search considers."""
    out = []
    for (solver, opts), (grid, rho), end, final in itertools.product(
        CANDIDATE_SOLVERS, CANDIDATE_GRIDS, SIGMA_ENDS, ("denoise",)
    ):
        out.append(Recipe(solver, dict(opts), grid, rho, end, final))
    return out


def run_recipe(p: GuidedProblem, recipe: Recipe, nfe: int) -> float:
    """Error of ``recipe`` at ``nfe`` on ``p`` (inf if it diverges; NaN if it cannot spend
    exactly ``nfe``)."""
    with torch.no_grad():
        x = _run_recipe(p, nfe, recipe.solver, dict(recipe.options), recipe.grid, recipe.rho,
                        recipe.t_end(p.schedule), recipe.final_step)
    return math.nan if x is None else rmse(x, p.reference)


def score_cells(problems: Sequence[GuidedProblem], recipes: Sequence[Recipe], nfes: Sequence[int]) -> dict[tuple[float, int], list[tuple[float, Recipe]]]:
    """Per (guidance, NFE): recipes sorted by their worst error ratio to the best peer over
    ``problems`` (all at that guidance)."""
    peer_rows = evaluate(peer_methods(), problems, nfes)
    best_peer: dict[tuple[str, int], float] = {}
    for r in peer_rows:
        key = (r["problem"], r["nfe"])
        best_peer[key] = min(best_peer.get(key, math.inf), r["error"])
    cells: dict[tuple[float, int], list[tuple[float, Recipe]]] = {}
    for nfe in nfes:
        scored = []
        for recipe in recipes:
            ratios = []
            for p in problems:
                e = run_recipe(p, recipe, nfe)
                ratios.append(e / best_peer[(p.name, nfe)] if math.isfinite(e) else math.inf)
            if not any(math.isnan(r) for r in ratios):
                scored.append((max(ratios), recipe))
        scored.sort(key=lambda z: z[0])
        cells[(problems[0].guidance, nfe)] = scored
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    """Run the search and print (or write) the per-cell winners."""
    p = argparse.ArgumentParser(prog="python -m dpmsolver.bench.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--top", type=int, default=8, help="candidates per cell checked on the network")
    p.add_argument("--nfe", default="5,6,8,10,12,15,20,25,50")
    p.add_argument("--guidance", default="1,3,7.5,15")
    args = p.parse_args(argv)
    nfes = [int(v) for v in args.nfe.split(",")]
    lines = ["| guidance | NFE | recipe | mixture score (seeds 0-1) | check score (network 0-1, mixture 3) |", "|---|---|---|---|---|"]
    for w in (float(v) for v in args.guidance.split(",")):
        mix = score_cells([mixture_problem(w, seed=0), mixture_problem(w, seed=1)], candidates(), nfes)
        checks = [digits_problem(w, seed=0, rtol=1e-5), digits_problem(w, seed=1, rtol=1e-5), mixture_problem(w, seed=3)]
        for nfe in nfes:
            top = mix[(w, nfe)][: args.top]
            net = score_cells(checks, [r for _, r in top], [nfe])[(w, nfe)]
            net_score = {id(r): s for s, r in net}
            best = min(top, key=lambda z: max(z[0], net_score.get(id(z[1]), math.inf)))
            lines.append(f"| {w:g} | {nfe} | `{best[1].describe()}` | {best[0]:.2f} | {net_score.get(id(best[1]), math.inf):.2f} |")
            sys.stdout.write(lines[-1] + "\n")
            sys.stdout.flush()
    text = "\n".join(lines) + "\n"
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
