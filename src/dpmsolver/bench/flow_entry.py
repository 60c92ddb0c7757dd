"""The step out of pure noise on rectified flow: the first evaluation carries the state there.

A rectified-flow sample starts from pure noise (``t = 1``, ``alpha = 0``: ``x_1 = z``), and
the default grids start a thousandth later (:data:`dpmsolver.timegrid.PURE_NOISE_OFFSET`),
where a multistep solver's second step can still be second order. Until stop 57 the noise
was placed at that first knot as it is, so every run started ``alpha_t (x0_hat - z)``
away from the ODE's state there: a thousandth of the data's distance from the noise, which
no budget removes. The loop now carries the state to the first knot by the first-order
data-prediction step from pure noise, ``x_t = sigma_t z + alpha_t x0_hat``, with the
first evaluation (:func:`dpmsolver.loop.solve`, ``start=``); it costs no evaluation.

For every rectified-flow problem of the suite (mixtures of every split, the trained flow
digits network where it is named) and guidance scale, on new noises
(:func:`.rescore.rescore_seed`: neither a pilot's nor a test set's), each cell runs the
same plan from the same noise with the entry step and without it (the old start), against
the exact ODE solution from ``x_1 = z``. Nothing is chosen from it: the step is the ODE's
own first-order step, not a fitted setting.

Recipes: the untuned default (``solver="auto"``), UniPC order 3 with its last orders
lowered (diffusers' flow default) and DPM-Solver++ 2M, each on its default grid. And a
study, not taken: ``unipc3_eps``, the same UniPC where the network predicts noise or
score, whose grid starts one time-uniform step below pure noise
(:func:`dpmsolver.sampling._off_pure_noise`; a noise prediction says nothing about the
data at pure noise), from ``sigma * noise`` (which leaves out that knot's ``alpha x0``,
``alpha`` = 1 / steps), against the noise carried there the same way. It lowers the
typical sample's error, but a whole step in, the data prediction made at the uncarried
state is far off under strong guidance: some cells blow up that the old start kept finite,
and others the other way, so ``sample()`` keeps ``sigma * noise`` there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from ..guidance import NormCap
from ..loop import solve
from ..recipe import PolicyRequest, Recipe, resolve
from ..sampling import _off_pure_noise
from .calibrated_peer import _Draw, _geo
from .records import command_line, publish
from .rescore import _sq, rescore_seed
from .suite import GUIDANCE, _rms, get_problem, suite_problems

__all__ = ["NFES", "NOISE_PREDICTION", "RECIPES", "EntryCell", "main", "markdown", "measure"]

#: Budgets measured (40 and 80 show the floor the old start left).
NFES = (5, 6, 8, 10, 12, 15, 20, 25, 40, 80)
_UNIPC3 = Recipe("unipc", {"order": 3}, lower_order_final=True)
#: The recipes compared, by label (None: the untuned default for the cell).
RECIPES: dict[str, Recipe | None] = {
    "auto": None,
    "unipc3": _UNIPC3,
    "dpmpp_2m": Recipe("dpmpp_2m"),
    "unipc3_eps": _UNIPC3,
}
#: The recipes run as a noise-predicting network's are (their grid one step in).
NOISE_PREDICTION = ("unipc3_eps",)


@dataclass(frozen=True)
class EntryCell:
    """One cell's RMS errors with the entry step (``entry``) and without it (``old``), and
    the median sample's (``entry_median``, ``old_median``)."""

    problem: str
    split: str
    recipe: str
    guidance: float
    nfe: int
    entry: float
    old: float
    entry_median: float
    old_median: float

    @property
    def ratio(self) -> float:
        """``entry / old``: below 1 the entry step helps."""
        return self.entry / self.old if self.old > 0 else math.nan

    @property
    def median_ratio(self) -> float:
        """The same for the median sample's error: under strong guidance one sample near a
        mode boundary, sent to the other mode by either start, can carry a cell's RMS."""
        return self.entry_median / self.old_median if self.old_median > 0 else math.nan


def measure(name: str, guidance: float, nfes: Sequence[int], n: int) -> list[EntryCell]:
    """Every recipe and budget of one problem and guidance scale on ``n`` new noises."""
    torch.set_num_threads(1)
    problem = get_problem(name)
    z = problem.noise(n, seed=rescore_seed(problem))  # type: ignore[arg-type]
    draw = _Draw(problem, guidance, z)  # type: ignore[arg-type]
    sched = problem.schedule
    out = []
    for label, fixed in RECIPES.items():
        for nfe in nfes:
            recipe = fixed or resolve("auto", PolicyRequest(nfe, guidance, sched))
            if label in NOISE_PREDICTION:
                recipe = _off_pure_noise(recipe, sched, "eps", nfe)
            plan = recipe.plan(sched, nfe=nfe)
            entry = plan.grid.pure_noise_entry
            if entry is None:
                raise RuntimeError(f"{name}: {recipe.describe()} does not start after pure noise")
            den = draw.den if recipe.x0_norm_cap is None else NormCap(draw.den, recipe.x0_norm_cap)
            limit = recipe.step_limiter()
            errors, medians = [], []
            for start in (entry, None):
                # the old start: the noise as the first knot's state, scaled by its sigma
                # where the grid starts a step in, unscaled a thousandth in (sample()'s)
                old_eps = start is None and label in NOISE_PREDICTION
                scale = plan.grid.knots[0].sigma if old_eps else 1.0
                x = solve(
                    den,
                    draw.x_T * scale,
                    plan,
                    check_finite="off",
                    final_step=recipe.final_step,
                    step_limit=limit,
                    start=start,
                ).x
                errors.append(_rms(x, draw.reference))
                medians.append(float(_sq(x, draw.reference).sqrt().median()))
            out.append(EntryCell(name, problem.split, label, guidance, nfe, *errors, *medians))
    return out


def _band(cells: Sequence[EntryCell], lo: int, hi: int) -> Sequence[EntryCell]:
    return [c for c in cells if lo <= c.nfe <= hi]


def markdown(cells: Sequence[EntryCell], command: str, minutes: float) -> str:
    """The record: per recipe and budget band, the ratio entry / old; then every cell."""
    out = [
        "# The step out of pure noise on rectified flow",
        "",
        (__doc__ or "").split("\n\n", 1)[1].strip(),
        "",
        f"Command: `{command}`; took {minutes:.1f} min on a shared machine of 2 CPUs.",
        "",
        "Ratio = RMS error with the entry step / without it (the old start), same plan and "
        "noises; < 1: the entry step is more accurate. Better / worse: by more than 1%. "
        "Median: the same for the median sample's error (the typical sample; one sample near "
        "a mode boundary that either start sends to the other mode can carry a cell's RMS "
        "under strong guidance).",
        "",
        "| recipe | NFE | cells | geo-mean ratio | best | worst | better | worse | "
        "median: geo-mean | better | worse |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bands = ((5, 10), (12, 25), (40, 80))
    for label in RECIPES:
        for lo, hi in bands:
            band = [c for c in _band(cells, lo, hi) if c.recipe == label]
            if not band:
                continue
            sel = [c.ratio for c in band]
            med = [c.median_ratio for c in band]
            out.append(
                f"| {label} | {lo}-{hi} | {len(sel)} | {_geo(sel):.3f} | {min(sel):.3f} | "
                f"{max(sel):.3f} | {sum(r < 0.99 for r in sel)} | {sum(r > 1.01 for r in sel)} | "
                f"{_geo(med):.3f} | {sum(r < 0.99 for r in med)} | {sum(r > 1.01 for r in med)} |"
            )
    out += [
        "",
        "## Every cell",
        "",
        "| problem | split | recipe | w | NFE | entry | old | ratio | median ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        out.append(
            f"| {c.problem} | {c.split} | {c.recipe} | {c.guidance:g} | {c.nfe} | "
            f"{c.entry:.3e} | {c.old:.3e} | {c.ratio:.3f} | {c.median_ratio:.3f} |"
        )
    return "\n".join(out) + "\n"


def _flow_problems() -> list[str]:
    return [p.name for p in suite_problems() if p.schedule.starts_at_pure_noise]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.flow_entry``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.flow_entry")
    ap.add_argument(
        "--problems", default=None, help="comma-separated (default: every flow mixture problem)"
    )
    ap.add_argument("--guidance", default=None, help="comma-separated (default 1,3,7.5,15)")
    ap.add_argument("--nfe", default=None, help="comma-separated (default 5,...,25,40,80)")
    ap.add_argument("--noises", type=int, default=128, help="new noises per cell (default 128)")
    ap.add_argument("--jobs", type=int, default=1, help="processes, one thread each (default 1)")
    ap.add_argument("--out", default=None, help="the markdown record")
    args = ap.parse_args(argv)
    names = args.problems.split(",") if args.problems else _flow_problems()
    for name in names:
        if not get_problem(name).schedule.starts_at_pure_noise:
            ap.error(f"--problems: {name!r} is not a rectified-flow problem")
    guidance = [float(v) for v in args.guidance.split(",")] if args.guidance else list(GUIDANCE)
    nfes = [int(v) for v in args.nfe.split(",")] if args.nfe else list(NFES)
    t0 = time.perf_counter()
    jobs = [(name, w) for name in names for w in guidance]
    cells: list[EntryCell] = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(measure, name, w, nfes, args.noises) for name, w in jobs]
        for (name, w), fut in zip(jobs, futures, strict=True):
            cells += fut.result()
            print(f"{name} w={w:g} done", file=sys.stderr, flush=True)
    command = command_line("dpmsolver.bench.flow_entry", argv)
    publish(markdown(cells, command, (time.perf_counter() - t0) / 60), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
