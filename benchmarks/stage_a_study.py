"""Stage (a) of dpmsolver.tune alone, four ways, scored on 512 new noises per cell.

For every (problem, guidance) of a suite split and every budget, the pilot is built as
``dpmsolver.tune`` builds it (128 noises of the tuned benchmark's pilot seed, the 512-row
guard), every stage (a) candidate is screened on 8 calibration rows, and the finalists
(the 4 best) are picked by tune's rule: the first, in ranking order, that the held-out half
takes over the default recipe. Four arms:

- ``cal``: candidates without SA-Solver's ODE form, ranked by calibration error (stop 30);
- ``tail``: the same finalists, ranked by :func:`dpmsolver.tune._tail_ranked` (stop 31);
- ``sa+cal`` / ``sa+tail``: SA-Solver's ODE form among the candidates, each ranking;
- ``tail2``: as ``tail``, but the calibration ranking is kept unless the tail estimate puts
  its first finalist's RMS error over 2x another's (``tail_ranking=2.0``);
- ``trig2`` (with ``--arms``): as ``tail2``, but only where the held-out half puts another
  finalist first (``tail_trigger="disagree"``).

Each arm's pick (or the default) samples 512 noises of the rescore seed (neither the
pilot's nor the test set's) and is scored by its RMS error to the exact sample. Stages
(b)-(e) do not run: this measures the choice that starts them.

Usage: python benchmarks/stage_a_study.py --split selection --jobs 2 --out FILE.md
       python benchmarks/stage_a_study.py --arms cal,tail2,trig2 ... (a subset of arms)
       python benchmarks/stage_a_study.py --tail-counts FILE.md  (picks over 2x / 4x)
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any

import torch

#: the arms run by default (the record of stop 31 / 32); ``--arms`` picks among ALL_ARMS
ARMS = ("cal", "tail", "sa+cal", "sa+tail", "tail2")
ALL_ARMS = (*ARMS, "trig2")
#: each arm's TuneOptions.tail_ranking
FACTOR = {"tail": 1.0, "sa+tail": 1.0, "tail2": 2.0, "trig2": 2.0}
#: each arm's TuneOptions.tail_trigger (default "always")
TRIGGER = {"trig2": "disagree"}
SA = ("unipc", {"order": 2, "variant": "bh1", "corrector_order": 2})
NFES = (5, 6, 8, 10, 12, 15, 20, 25)
GUIDANCE = (1.0, 3.0, 7.5, 15.0)


def _pair(name: str, w: float, arms: tuple[str, ...] = ARMS) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    from dpmsolver.bench.rescore import conditioning, network, rescore_seed
    from dpmsolver.bench.suite import _rms, get_problem
    from dpmsolver.bench.tuned import PILOT, pilot_seed
    from dpmsolver.recipe import PolicyRequest, resolve
    from dpmsolver.sampling import NonFiniteError, SampleOptions, sample
    from dpmsolver.tune import TuneOptions
    from dpmsolver.tune.acceptance import _accept
    from dpmsolver.tune.pilot import _choice, _Counter, _pilot, _RowDenoiser
    from dpmsolver.tune.selection import _held_first, _ranked, _screened, _tail_ranked

    p = get_problem(name)
    noise = p.noise(PILOT, seed=pilot_seed(p))
    c = conditioning(p, PILOT)
    opts = TuneOptions()
    options = SampleOptions(model_dtype=noise.dtype)
    den = _Counter(_RowDenoiser(network(p), "x0", c["cond"], c["uncond"], w, options))
    guard = (opts.guard_rows, opts.guard_factor)
    prob = _pilot(den, p.schedule, noise, opts.rtol, opts.check_rows, 0, 0, guard=guard)
    z = p.noise(512, seed=rescore_seed(p))
    ref = p.check_reference(p.denoiser(w, p.labels(512)), p.x_T(z)).sample
    new_errors: dict[str, float] = {}

    def new_error(recipe: Any, nfe: int) -> float:
        key = repr(recipe)
        if key not in new_errors:
            try:
                x = sample(
                    network(p), z, schedule=p.schedule, prediction="x0", solver=recipe,
                    nfe=nfe, guidance_scale=w, **conditioning(p, 512),
                ).x  # fmt: skip
                new_errors[key] = _rms(x, ref)
            except (NonFiniteError, ValueError):
                new_errors[key] = math.inf
        return new_errors[key]

    rows = []
    for nfe in NFES:
        new_errors.clear()
        default = resolve("auto", PolicyRequest(nfe, w, p.schedule))
        dchoice = _choice(prob, default, nfe, "default")
        extra = (SA,) if any(a.startswith("sa") for a in arms) else ()
        wider = replace(opts, solvers=(*opts.solvers, *extra))
        scored = [r for _, r in _screened(prob, nfe, wider)]
        # without SA, the candidate list is stop 30's (TUNE_SOLVERS may already hold it)
        plain = [r for r in scored if (r.solver, r.options) != SA][: opts.finalists]
        with_sa = scored[: opts.finalists]
        choices = {repr(r): _choice(prob, r, nfe, "selection") for r in [*plain, *with_sa]}
        out = {"problem": name, "w": w, "nfe": nfe, "default": new_error(default, nfe)}
        for arm in arms:
            pool = with_sa if arm.startswith("sa") else plain
            finalists = _ranked(prob, [choices[repr(r)] for r in pool], opts)
            if arm in FACTOR:
                trigger = TRIGGER.get(arm, "always")
                ranking = replace(opts, tail_ranking=FACTOR[arm], tail_trigger=trigger)
                if trigger != "always":
                    live = [f for f in finalists if bool(torch.isfinite(f.held).all())]
                    out[arm + "_fired"] = len(live) > 1 and _held_first(live) is not live[0]
                finalists = _tail_ranked(prob, finalists, ranking)
            pick = next((f for f in finalists if _accept(f, dchoice, prob, None)), dchoice)
            out[arm] = new_error(pick.recipe, nfe)
            out[arm + "_recipe"] = pick.recipe.describe()
        out["best"] = min(new_error(ch.recipe, nfe) for ch in choices.values())
        prob.guard.forget(nfe)
        rows.append(out)
    return rows


def _geo(values: list[float]) -> float:
    v = [x for x in values if math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else math.nan


def markdown(
    rows: list[dict[str, Any]], command: str, minutes: float, arms: tuple[str, ...] = ARMS
) -> str:
    title = (
        "# Stage (a) alone: finalists ranked by calibration error or with the tail ranking,"
        " with and without SA-Solver's ODE form"
        if arms == ARMS
        else "# Stage (a) alone: the arms " + ", ".join(arms)
    )
    lines = [
        title,
        "",
        (__doc__ or "").split("Usage:")[0].strip(),
        "",
        f"Command: `{command}`; took {minutes:.1f} min on a shared machine of 2 CPUs.",
        "",
        "Ratio = the arm's pick's RMS error on the 512 new noises / the best finalist's (of"
        " either candidate list) there.",
        "",
        "| arm | cells | geo-mean ratio to the best finalist | picks the best finalist"
        " | worst ratio | geo-mean ratio to cal | better than cal | worse than cal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        ratios = [r[arm] / r["best"] for r in rows]
        vs = [r[arm] / r["cal"] for r in rows]
        best = sum(x <= 1.0 + 1e-12 for x in ratios)
        better, worse = sum(x < 1 - 1e-9 for x in vs), sum(x > 1 + 1e-9 for x in vs)
        lines.append(
            f"| {arm} | {len(rows)} | {_geo(ratios):.3f} | {best} | {max(ratios):.2f} | "
            f"{_geo(vs):.3f} | {better} | {worse} |"
        )
    for arm in arms:
        fired = [r[arm + "_fired"] for r in rows if arm + "_fired" in r]
        if fired:
            lines.append(
                f"\n{arm}: the halves disagree (the tail ranking runs) in {sum(fired)} of"
                f" {len(fired)} cells."
            )
    shown = [a for a in arms if a != "sa+cal"]  # its picks are sa+tail's or cal's mostly
    head = ["problem", "w", "NFE", "default", *arms, "best", *(a + " pick" for a in shown)]
    lines += [
        "",
        "## Cells where the arms pick differently",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if len({r[a + "_recipe"] for a in arms}) > 1:
            picks = " | ".join(r[a + "_recipe"] for a in shown)
            lines.append(
                f"| {r['problem']} | {r['w']:g} | {r['nfe']} | {r['default']:.3e} | "
                + " | ".join(f"{r[a]:.3e}" for a in arms)
                + f" | {r['best']:.3e} | {picks} |"
            )
    return "\n".join(lines) + "\n"


def tail_counts(record: str) -> str:
    """From a record's "Cells where the arms pick differently" table: per arm, how many of
    those cells' picks are over 2x and over 4x the best finalist on the new noises (in the
    other cells every arm picks the same, so their counts are the same for every arm)."""
    table = record.split("## Cells where the arms pick differently")[1]
    cells = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ")
    ]
    head, rows = cells[0], cells[1:]
    arms = head[4 : head.index("best")]
    lines = [f"{len(rows)} cells where the arms pick differently", "arm: over 2x, over 4x"]
    for k, arm in enumerate(arms):
        ratios = [float(r[4 + k]) / float(r[4 + len(arms)]) for r in rows]
        lines.append(f"{arm}: {sum(x > 2 for x in ratios)}, {sum(x > 4 for x in ratios)}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="selection")
    ap.add_argument("--problems", default=None)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--arms", default=None, help=f"a comma-separated subset of {ALL_ARMS}")
    ap.add_argument("--tail-counts", default=None, metavar="RECORD", help="summarise a record")
    a = ap.parse_args()
    if a.tail_counts:
        with open(a.tail_counts) as f:
            print(tail_counts(f.read()))
        return
    if a.out is None:
        ap.error("--out is required")
    from dpmsolver.bench.suite import suite_problems

    arms = tuple(a.arms.split(",")) if a.arms else ARMS
    unknown = [x for x in arms if x not in ALL_ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; accepted: {', '.join(ALL_ARMS)}")
    names = a.problems.split(",") if a.problems else [p.name for p in suite_problems(a.split)]
    pairs = [(n, w, arms) for n in names for w in GUIDANCE]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(_pair, *zip(*pairs, strict=True)))
    rows = [r for rs in results for r in rs]
    given = (
        ("split", a.split), ("problems", a.problems), ("arms", a.arms), ("jobs", a.jobs),
        ("out", a.out),
    )  # fmt: skip
    cmd = "python benchmarks/stage_a_study.py " + " ".join(f"--{k} {v}" for k, v in given if v)
    with open(a.out, "w") as f:
        f.write(markdown(rows, cmd, (time.perf_counter() - t0) / 60, arms))


if __name__ == "__main__":
    main()
