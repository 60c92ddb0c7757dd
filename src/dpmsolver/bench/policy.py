"""The default recipe (``solver="auto"``): chosen for the worst case on one half of the
suite, scored on the other.

``solver="auto"`` is what users get when they do not tune (:mod:`dpmsolver.tune` fits one
model). It must not lose badly on a model nobody measured, so it is chosen, and judged, by
its *worst* error ratio to the best peer: in a cell (problem, guidance scale, NFE) the ratio
is our error over the smallest error among all peer configurations (diffusers, k-diffusion;
:mod:`.peer_suite`) in that cell, an oracle none of them is.

1. Candidates (:func:`candidates`): our deterministic solvers x time grids x where to stop,
   each ending with the data-prediction step to sigma = 0. Every candidate runs on every
   problem of the suite (:mod:`.suite`, both halves), guidance scale and NFE, on the 64
   noises and labels the peers ran on in ``benchmarks/suite_baseline.csv.gz`` (whose peer
   errors are reused; each problem and guidance scale reruns one peer cell to check that the
   noise, labels and reference agree). A candidate that cannot spend a budget exactly (a
   singlestep solver at an even NFE, or on rectified flow, where its first step out of pure
   noise drops to first order) has no error there and cannot be chosen for it.
2. The rule (:func:`fit`, :class:`Rule`): a policy maps a key (schedule family group,
   guidance group, NFE group: a :class:`Granularity`) to the candidate whose ratios over the
   training problems' cells of that key have the smallest power mean (:func:`power_mean`;
   power inf: the worst ratio, 0: the geometric mean). Which granularity and which power is
   decided by leave-one-problem-out on the selection half (:func:`choose_rule`): fit on all
   selection problems but one, score the one left out, for each problem and every rule of
   :data:`RULES`. Rules whose worst left-out ratio is within :data:`TIE_BAND` of the
   smallest are tied, and the geometric mean of the left-out problems' worst ratios
   decides among them (then the coarser, then the larger power).
3. That rule is fitted on all selection problems (what :mod:`dpmsolver.auto` ships) and
   scored on the held-out half and on the fresh problems (defined before the rule was
   chosen without them, and scored once), beside every single peer
   configuration's worst ratio (over all its cells, and over the cells each configuration
   runs), plain
   ``dpmpp_2m`` (the library's default solver) and the previous ``auto`` table
   (:data:`PREVIOUS_AUTO`).

``python -m dpmsolver.bench.policy [--quick] [--jobs 2] [--out benchmarks/policy.md]
[--csv benchmarks/policy.csv.gz]`` reruns everything; ``--from-csv benchmarks/policy.csv.gz``
re-renders the markdown from recorded errors without running anything.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..recipe import Recipe
from ..solvers import Form
from ..timegrid import GridKind
from .records import command_line, publish, read_text, write_text
from .suite import (
    FRESH_ROUNDS,
    GUIDANCE,
    NFES,
    BaselineRow,
    Problem,
    _DenoiserNetwork,
    get_problem,
    rows_from_csv,
    suite_problems,
)

__all__ = [
    "CANDIDATE_GROUPS",
    "DEFAULT_LABEL",
    "FAMILIES",
    "GRANULARITIES",
    "POWERS",
    "PREVIOUS_AUTO",
    "PREVIOUS_LABEL",
    "RULES",
    "TIE_BAND",
    "CandidateGroup",
    "Granularity",
    "PolicyTable",
    "Rule",
    "Study",
    "candidates",
    "choose_rule",
    "fit",
    "leave_one_out",
    "loo_worsts",
    "main",
    "measure",
    "minimax",
    "pick_rule",
    "power_mean",
    "recipe_label",
    "render",
    "rule_named",
]

Cell = tuple[str, float, int]  # (problem, guidance, NFE)
#: The schedule families, in the order tables list them.
FAMILIES: tuple[str, ...] = ("discrete", "vp", "ve", "flow")
PEERS_CSV = "benchmarks/suite_baseline.csv.gz"
#: The library's default solver as users get it (``sample(solver="dpmpp_2m")``).
DEFAULT_LABEL = "library default dpmpp_2m"
#: The ``auto`` table this module replaced (:data:`PREVIOUS_AUTO`), as ``sample`` ran it.
PREVIOUS_LABEL = "previous auto"
#: The peer cell rerun per problem and guidance scale to check that the noise matches.
CHECK_PEER, CHECK_NFE = "k-diffusion dpmpp_2m exponential", 10
CSV_COLUMNS = "problem,split,family,guidance,nfe,method,error,worst_sample,spent"

# --------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------

Solvers = tuple[tuple[str, dict[str, Any]], ...]
Grids = tuple[tuple[GridKind, float | None], ...]


@dataclass(frozen=True)
class CandidateGroup:
    """Candidates: every solver on every grid with every end.

    Attributes:
        name: for the report.
        solvers: (registry name, options).
        grids: (grid kind, rho).
        ends: ``sigma_end`` values (None: the schedule's own end).
        step_limit: the recipes' :attr:`~dpmsolver.recipe.Recipe.step_limit` (None: none).
    """

    name: str
    solvers: Solvers
    grids: Grids
    ends: tuple[float | None, ...] = (None,)
    step_limit: float | None = None


#: The multistep solvers whose step has a correction beyond the first-order (DDIM) step.
CORRECTED: Solvers = (
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "form": Form.NOISE}),
    ("deis", {"order": 3}),
    ("ipndm", {"order": 4, "coefficients": "fixed"}),
)

FOUR_GRIDS: Grids = (
    ("logsnr", None),
    ("karras", 7.0),
    ("time_uniform", None),
    ("time_quadratic", None),
)

#: The most stable solvers, also stopping early (a group of their own, with and without the
#: step limit).
_EARLY = CandidateGroup(
    "stopping early",
    (("dpmpp_2m", {}), ("unipc", {"order": 2})),
    (("logsnr", None), ("time_quadratic", None)),
    (0.07,),
)
#: The step-limited candidates' :attr:`~dpmsolver.recipe.Recipe.step_limit`: tune's stage (d)
#: factor, not fitted.
STEP_LIMIT = 2.0

#: The candidates (70). Each costs about 1.5 minutes over the whole suite on one shared CPU
#: thread (0.5 with two processes, stop 38), so the set is a compromise: the multistep
#: solvers of every family on the four grid shapes (log-SNR, Karras, uniform and quadratic
#: in time), the fast singlestep solver, and the most stable ones also stopping early (38,
#: stop 19); and since stop 38 the same multistep solvers, but DDIM, with the step limit
#: (32; benchmarks/policy_step_limit.md). (A 119-candidate run -- every grid, more variants
#: -- was estimated at over 5 hours and not run.)
CANDIDATE_GROUPS: tuple[CandidateGroup, ...] = (
    CandidateGroup(
        "multistep solvers on four grids",
        (("ddim", {}), *CORRECTED),
        FOUR_GRIDS,
    ),
    CandidateGroup(
        "a singlestep solver (it cannot spend every budget)",
        (("dpmpp_fast", {}),),
        (("logsnr", None), ("time_quadratic", None)),
    ),
    _EARLY,
    # stop 38: the calibration-free half of tune's stage (d). A sample whose correction
    # outgrows its first-order step is the blow-up that decides the default's worst cells
    # (one sample of 64 carries all of the decisive cell's squared error). DDIM has no
    # correction, so the limit would not change it.
    CandidateGroup(
        f"the step limit ({STEP_LIMIT:g}) on four grids",
        CORRECTED,
        FOUR_GRIDS,
        step_limit=STEP_LIMIT,
    ),
    dataclasses.replace(
        _EARLY, name=f"the step limit ({STEP_LIMIT:g}), stopping early", step_limit=STEP_LIMIT
    ),
)
#: ``--quick``: a handful of candidates, to check the pipeline end to end.
QUICK = (
    "dpmpp_2m logsnr",
    "dpmpp_2m time_uniform",
    "unipc(order=2) logsnr",
    "unipc(order=3) karras7",
    "unipc(order=2;form=noise) logsnr",
    "ddim time_uniform",
    "dpmpp_fast time_quadratic",
    "unipc(order=2) time_quadratic sigma_end=0.07",
)


def _value(v: Any) -> str:
    return str(v.value) if isinstance(v, Enum) else str(v)


def recipe_label(recipe: Recipe) -> str:
    """A recipe as a short label (solver, options, grid, rho, end): ``unipc(order=2;form=noise)
    karras7 sigma_end=0.07``."""
    opts = ";".join(f"{k}={_value(v)}" for k, v in recipe.options.items())
    grid: str = recipe.grid or "default-grid"
    if recipe.rho is not None:
        grid += f"{recipe.rho:g}"
    if recipe.sigma_max is not None:  # no candidate sets it; the study scripts do
        grid += f" sigma_max={recipe.sigma_max:g}"
    stop = f" sigma_end={recipe.sigma_end:g}" if recipe.sigma_end is not None else ""
    if recipe.step_limit is not None:
        stop += f" step_limit={recipe.step_limit:g}"
    return f"{recipe.solver}{f'({opts})' if opts else ''} {grid}{stop}"


def _group_recipes(group: CandidateGroup) -> list[Recipe]:
    return [
        Recipe(s, dict(o), g, rho, sigma_end=end, step_limit=group.step_limit)
        for (s, o), (g, rho), end in itertools.product(group.solvers, group.grids, group.ends)
    ]


def _group_labels(group: CandidateGroup) -> list[str]:
    return [recipe_label(r) for r in _group_recipes(group)]


def candidates() -> dict[str, Recipe]:
    """Every candidate recipe of :data:`CANDIDATE_GROUPS`, by label."""
    recipes = [r for group in CANDIDATE_GROUPS for r in _group_recipes(group)]
    out = {recipe_label(r): r for r in recipes}
    assert len(out) == len(recipes), "candidate labels must be unique"
    return out


#: ``solver="auto"`` before this module: one recipe per (guidance, NFE), chosen by
#: :mod:`.search` on the benchmark mixture (``mix16-sd``) and the digits network, blind to
#: the schedule (the cells of the suite's NFEs; kept to score it on the held-out half).
PREVIOUS_AUTO: dict[tuple[float, int], Recipe] = {
    (1.0, 5): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),
    (1.0, 6): Recipe(
        "unipc", {"order": 2, "variant": "bh1"}, "polyexponential", rho=1.5, sigma_end=0.07
    ),
    (1.0, 8): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr", sigma_end=0.07),
    (1.0, 10): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr"),
    (1.0, 12): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr"),
    (1.0, 15): Recipe("unipc", {"order": 3}, "logsnr"),
    (1.0, 20): Recipe("unipc", {"form": Form.NOISE, "order": 3}, "logsnr"),
    (1.0, 25): Recipe("unipc", {"form": Form.NOISE, "order": 3}, "logsnr"),
    (3.0, 5): Recipe("dpmpp_fast", {}, "polyexponential", rho=1.5, sigma_end=0.14),
    (3.0, 6): Recipe("unipc", {"order": 2}, "time_quadratic", sigma_end=0.14),
    (3.0, 8): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),
    (3.0, 10): Recipe("deis", {"order": 3}, "polyexponential", rho=0.7),
    (3.0, 12): Recipe("ipndm", {"coefficients": "fixed", "order": 3}, "polyexponential", rho=0.7),
    (3.0, 15): Recipe("unipc", {"order": 3}, "logsnr"),
    (3.0, 20): Recipe("unipc", {"order": 3}, "logsnr"),
    (3.0, 25): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr"),
    (7.5, 5): Recipe("dpmpp_fast", {}, "time_quadratic", sigma_end=0.14),
    (7.5, 6): Recipe("dpmpp_fast", {}, "logsnr", sigma_end=0.07),
    (7.5, 8): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.14),
    (7.5, 10): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),
    (7.5, 12): Recipe("ipndm", {"coefficients": "fixed", "order": 3}, "polyexponential", rho=0.7),
    (7.5, 15): Recipe("dpm_3m", {}, "karras", rho=7.0),
    (7.5, 20): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr"),
    (7.5, 25): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "karras", rho=7.0),
    (15.0, 5): Recipe("dpmpp_2s", {}, "polyexponential", rho=0.7, sigma_end=0.14),
    (15.0, 6): Recipe("dpmpp_fast", {}, "logsnr", sigma_end=0.14),
    (15.0, 8): Recipe("dpmpp_fast", {}, "time_quadratic", sigma_end=0.14),
    (15.0, 10): Recipe("unipc", {"order": 2}, "logsnr", sigma_end=0.07),
    (15.0, 12): Recipe("unipc", {"order": 2}, "polyexponential", rho=0.7),
    (15.0, 15): Recipe("unipc", {"order": 2}, "karras", rho=7.0),
    (15.0, 20): Recipe("unipc", {"order": 2, "variant": "bh1"}, "logsnr"),
    (15.0, 25): Recipe("unipc", {"form": Form.NOISE, "order": 2}, "logsnr"),
}

# A method maps (guidance, NFE) to the recipe it runs; candidates ignore both.
Method = Callable[[float, int], Recipe]


def _methods(labels: Iterable[str] | None = None) -> dict[str, tuple[Method, bool]]:
    """What :func:`measure` runs: label -> (method, whether it must spend the budget
    exactly). The previous ``auto`` table runs as ``sample`` ran it, spending what it spent."""
    cands = candidates()
    chosen = list(cands) if labels is None else list(labels)
    out: dict[str, tuple[Method, bool]] = {
        DEFAULT_LABEL: (lambda w, n: Recipe("dpmpp_2m"), True),
        PREVIOUS_LABEL: (lambda w, n: PREVIOUS_AUTO[(w, n)], False),
    }
    for label in chosen:
        out[label] = ((lambda r: lambda w, n: r)(cands[label]), True)
    return out


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorRow:
    """One method's outcome in one cell.

    Attributes:
        error: RMS error against the exact sample (inf if the run went non-finite).
        worst_sample: the largest per-sample RMS error.
        spent: evaluations made (a candidate that could not spend exactly ``nfe`` is not
            recorded at all).
    """

    problem: str
    split: str
    family: str
    guidance: float
    nfe: int
    method: str
    error: float
    worst_sample: float
    spent: int


def run_recipe(
    problem: Problem, denoiser: Any, z: Tensor, recipe: Recipe, nfe: int
) -> tuple[Tensor | None, int]:
    """``recipe`` through :func:`dpmsolver.sample` from the standard noise ``z`` at ``nfe``
    evaluations, on ``problem``'s guided denoiser presented as an ``x0`` network. Returns
    the sample (None if the recipe cannot plan ``nfe``; NaN if it went non-finite) and the
    evaluations it made."""
    from ..sampling import NonFiniteError, sample

    calls = [0]
    inner = _DenoiserNetwork(denoiser, problem.schedule)

    def net(x: Tensor, t: Tensor) -> Tensor:
        calls[0] += 1
        return inner(x, t)

    try:
        with torch.no_grad():
            res = sample(net, z, schedule=problem.schedule, prediction="x0", solver=recipe, nfe=nfe)
    except NonFiniteError:
        return torch.full_like(z, math.nan), calls[0]
    except ValueError:
        return None, 0
    return res.x, calls[0]


def _errors(x: Tensor, ref: Tensor) -> tuple[float, float]:
    per = ((x.double() - ref.double()) ** 2).flatten(1).mean(1)
    if not bool(torch.isfinite(per).all()):
        return math.inf, math.inf
    return float(per.mean().sqrt()), float(per.max().sqrt())


def _measure_problem(
    name: str,
    labels: Sequence[str] | None,
    guidances: Sequence[float],
    nfes: Sequence[int],
    batch: int,
    peer_check: Mapping[tuple[float, int], float],
    skip: frozenset[str] = frozenset(),
    cache: str | None = None,
) -> tuple[list[ErrorRow], list[str]]:
    """Every method on one problem but those in ``skip`` (a worker of :func:`measure`)."""
    from .peer_suite import peer_configs, run_peers

    torch.set_num_threads(1)
    _quiet_diffusers()
    p = get_problem(name)
    methods = {k: v for k, v in _methods(labels).items() if k not in skip}
    z = p.noise(batch)
    y = p.labels(batch)
    x_T = p.x_T(z)
    rows: list[ErrorRow] = []
    log: list[str] = []
    check = [c for c in peer_configs(p.family) if c.label == CHECK_PEER]
    for w in guidances:
        t0 = time.perf_counter()
        den = p.denoiser(w, y)
        path = None if cache is None else os.path.join(cache, f"{name}-w{w:g}-n{batch}.pt")
        if path is not None and os.path.exists(path):
            ref = torch.load(path)
        else:
            ref = p.reference(den, x_T)
            if path is not None:
                torch.save(ref, path)
        t_ref = time.perf_counter() - t0
        if check and (w, CHECK_NFE) in peer_check:
            (res,) = run_peers(p, w, y, x_T, CHECK_NFE, configs=check, denoiser=den)
            assert res.sample is not None
            mine, theirs = _errors(res.sample, ref)[0], peer_check[(w, CHECK_NFE)]
            if not abs(mine - theirs) <= 2e-3 * theirs:
                raise RuntimeError(
                    f"{name} w={w:g}: {CHECK_PEER} at {CHECK_NFE} NFE has error {mine:.4g} here "
                    f"and {theirs:.4g} in the peer CSV: not the same noise, labels or reference"
                )
        for label, (method, exact) in methods.items():
            for nfe in nfes:
                x, spent = run_recipe(p, den, z, method(w, nfe), nfe)
                if x is None or (exact and spent != nfe):
                    continue
                err, worst = _errors(x, ref)
                rows.append(ErrorRow(name, p.split, p.family, w, nfe, label, err, worst, spent))
        log.append(
            f"{name} w={w:g}: reference {t_ref:.1f} s, {len(methods)} methods "
            f"{time.perf_counter() - t0 - t_ref:.1f} s"
        )
    return rows, log


def _cost(p: Problem) -> float:
    size = math.prod(p.shape)
    return float(size * int(p.features.get("components", 1)))


def measure(
    problems: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    guidances: Sequence[float] = GUIDANCE,
    nfes: Sequence[int] = NFES,
    batch: int = 64,
    peers: Sequence[BaselineRow] = (),
    jobs: int = 1,
    reuse: Sequence[ErrorRow] = (),
    cache: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[ErrorRow]:
    """Every candidate (``labels``, default all), the library default and the previous
    ``auto`` on every problem, guidance scale and NFE, from each problem's default noise
    (``batch`` samples). With ``peers`` (the baseline's rows) one peer cell per problem and
    guidance scale is rerun and must agree with it. ``jobs`` processes, one problem each.
    Methods with rows in ``reuse`` for a problem are not rerun there (their rows are kept);
    ``cache``: a folder for the exact samples (computed once per problem, guidance scale and
    batch)."""
    check = {
        (r.problem, r.guidance, r.nfe): r.errors[CHECK_PEER]
        for r in peers
        if CHECK_PEER in r.errors
    }
    args = [
        (
            name,
            labels,
            guidances,
            nfes,
            batch,
            {(w, n): e for (q, w, n), e in check.items() if q == name},
            frozenset(r.method for r in reuse if r.problem == name),
            cache,
        )
        for name in problems
    ]
    # the largest problems first, so that the processes finish together
    args.sort(key=lambda a: -_cost(get_problem(str(a[0]))))
    # a reused row takes its problem's split now (a finished fresh round joins the selection)
    rows: list[ErrorRow] = [
        dataclasses.replace(r, split=get_problem(r.problem).split)
        for r in reuse
        if r.problem in problems
    ]

    def take(got: list[ErrorRow], lines: list[str]) -> None:
        rows.extend(got)
        for line in lines:
            if log is not None:
                log(line)

    if jobs <= 1:
        for a in args:
            take(*_measure_problem(*a))
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            futures = [pool.submit(_measure_problem, *a) for a in args]
            for fut in concurrent.futures.as_completed(futures):
                take(*fut.result())
    order = {name: i for i, name in enumerate(problems)}
    rows.sort(key=lambda r: (order[r.problem], r.guidance, r.method, r.nfe))
    return rows


def rows_csv(rows: Sequence[ErrorRow], note: str = "") -> str:
    """The rows as CSV (:data:`CSV_COLUMNS`), after a ``# note`` line if given (the command
    and its runtime, which ``--from-csv`` renders again)."""
    lines = [f"# {note}"] if note else []
    lines.append(CSV_COLUMNS)
    for r in rows:
        lines.append(
            f"{r.problem},{r.split},{r.family},{r.guidance:g},{r.nfe},{r.method},"
            f"{r.error:.4g},{r.worst_sample:.4g},{r.spent}"
        )
    return "\n".join(lines) + "\n"


def rows_from_text(text: str) -> tuple[list[ErrorRow], str]:
    """The rows :func:`rows_csv` wrote, and its note."""
    lines = text.strip().splitlines()
    note = ""
    if lines and lines[0].startswith("# "):
        note, lines = lines[0][2:], lines[1:]
    if lines[0] != CSV_COLUMNS:
        raise ValueError(f"expected the header {CSV_COLUMNS!r}")
    out = []
    for line in lines[1:]:
        problem, split, family, w, nfe, method, err, worst, spent = line.split(",")
        out.append(
            ErrorRow(
                problem,
                split,
                family,
                float(w),
                int(nfe),
                method,
                float(err),
                float(worst),
                int(spent),
            )
        )
    return out, note


# --------------------------------------------------------------------------------------
# The selection rule
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Granularity:
    """How finely a policy is tabulated: families, guidance scales and NFEs that share one
    recipe (groups of the measured values).

    Attributes:
        name: for tables.
        families: groups of schedule families.
        guidance: groups of measured guidance scales.
        nfe: groups of measured NFEs.
    """

    name: str
    families: tuple[tuple[str, ...], ...]
    guidance: tuple[tuple[float, ...], ...]
    nfe: tuple[tuple[int, ...], ...]

    def keys(self) -> list[tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...]]]:
        """Every (family group, guidance group, NFE group)."""
        return list(itertools.product(self.families, self.guidance, self.nfe))


def _granularities() -> list[Granularity]:
    fams = {
        "one table": (FAMILIES,),
        "flow apart": (("discrete", "vp", "ve"), ("flow",)),
        # stop 63: VE/EDM's time is its noise level, so a grid uniform in time there is
        # another spacing than on VP or flow schedules (benchmarks/policy_round9.md)
        "ve apart": (("discrete", "vp", "flow"), ("ve",)),
        "ve and flow apart": (("discrete", "vp"), ("ve",), ("flow",)),
        "per family": tuple((f,) for f in FAMILIES),
    }
    guid = {
        "per w": tuple((w,) for w in GUIDANCE),
        "w {1,3} {7.5,15}": ((1.0, 3.0), (7.5, 15.0)),
        "any w": (GUIDANCE,),
    }
    nfe = {
        "per NFE": tuple((n,) for n in NFES),
        "NFE pairs": ((5, 6), (8, 10), (12, 15), (20, 25)),
        "NFE thirds": ((5, 6, 8), (10, 12, 15), (20, 25)),
        "any NFE": (NFES,),
    }
    return [
        Granularity(f"{fk}, {gk}, {nk}", fv, gv, nv)
        for (fk, fv), (gk, gv), (nk, nv) in itertools.product(
            fams.items(), guid.items(), nfe.items()
        )
    ]


#: The granularities leave-one-problem-out chooses among (family grouping x guidance
#: grouping x NFE grouping), finest first within each factor.
GRANULARITIES: list[Granularity] = _granularities()

Ratios = Mapping[Cell, Mapping[str, float]]


def _geomean(values: Iterable[float]) -> float:
    vals = list(values)
    if not vals:
        return math.nan
    if any(not math.isfinite(v) for v in vals):
        return math.inf
    return math.exp(sum(math.log(max(v, 1e-300)) for v in vals) / len(vals))


def power_mean(values: Sequence[float], power: float) -> float:
    """``(mean of v**power)**(1/power)``: the largest value for ``power = inf``, the
    geometric mean for ``power = 0``; inf if any value is."""
    if any(not math.isfinite(v) for v in values):
        return math.inf
    if power == math.inf:
        return max(values)
    if power == 0:
        return _geomean(values)
    # scaled by the largest value so that large ratios and powers do not overflow
    top = max(values)
    return top * (sum((v / top) ** power for v in values) / len(values)) ** (1 / power)


def minimax(
    ratios: Ratios, cells: Sequence[Cell], methods: Iterable[str], power: float = math.inf
) -> tuple[str, float, float] | None:
    """The method whose :func:`power_mean` of ratios over ``cells`` is smallest (``power =
    inf``, the default: the smallest worst ratio; ties: the smaller worst, then the smaller
    geometric mean, then the label), with its worst ratio and geometric mean; a method
    without a ratio in one of the cells (it cannot spend that budget) is not eligible.
    None if no method is."""
    best: tuple[float, float, float, str] | None = None
    for m in methods:
        vals = [ratios[c].get(m) for c in cells]
        if not cells or any(v is None or math.isnan(v) for v in vals):
            continue
        fvals = [float(v) for v in vals if v is not None]
        key = (power_mean(fvals, power), max(fvals), _geomean(fvals), m)
        if best is None or key < best:
            best = key
    return None if best is None else (best[3], best[1], best[2])


class _Cube:
    """``ratios`` of ``methods`` as one array (cells x methods; NaN where a method has no
    ratio), so that :func:`fit` can rank every method at once. Only a shortlist is then
    ranked by :func:`minimax` itself, so the choice is the same to the last bit."""

    def __init__(self, ratios: Ratios, methods: Sequence[str]) -> None:
        self.ratios, self.methods = ratios, list(methods)
        self.row = {c: i for i, c in enumerate(ratios)}
        self.values = np.array(
            [[v.get(m, math.nan) for m in self.methods] for v in ratios.values()],
            dtype=np.float64,
        ).reshape(len(self.row), len(self.methods))

    def shortlist(self, cells: Sequence[Cell], power: float) -> list[str]:
        """The methods whose power mean over ``cells`` could be the smallest: within 1e-9
        of it as numpy computes it (its sums differ from :func:`power_mean`'s in the last
        bits only), or every eligible method where that is inf."""
        if not cells:
            return []
        sub = self.values[[self.row[c] for c in cells]]
        eligible = np.asarray(~np.isnan(sub).any(axis=0), dtype=bool)
        if not eligible.any():
            return []
        sub = sub[:, eligible]
        names = [m for m, ok in zip(self.methods, eligible.tolist(), strict=True) if ok]
        with np.errstate(all="ignore"):
            top = sub.max(axis=0)
            if power == math.inf:
                mean = top
            elif power == 0:
                mean = np.exp(np.log(np.maximum(sub, 1e-300)).mean(axis=0))
            else:
                mean = top * ((sub / top) ** power).mean(axis=0) ** (1 / power)
        mean = np.where(np.isinf(sub).any(axis=0), math.inf, mean)
        best = float(mean.min())
        if not math.isfinite(best):
            return names
        near = np.asarray(mean <= best * (1 + 1e-9), dtype=bool).tolist()
        return [m for m, ok in zip(names, near, strict=True) if ok]


_CUBES: dict[tuple[int, tuple[str, ...]], _Cube] = {}


def _cube(ratios: Ratios, methods: Sequence[str]) -> _Cube:
    """The :class:`_Cube` of these ``ratios`` (the same object, not mutated since) and
    ``methods``, built once."""
    key = (id(ratios), tuple(methods))
    got = _CUBES.get(key)
    if got is None or got.ratios is not ratios:
        if len(_CUBES) >= 4:
            _CUBES.clear()
        got = _CUBES[key] = _Cube(ratios, methods)
    return got


PolicyTable = dict[tuple[str, float, int], str]  # (family, guidance, NFE) -> method


def fit(
    ratios: Ratios,
    family: Mapping[str, str],
    problems: Sequence[str],
    granularity: Granularity,
    methods: Sequence[str],
    power: float = math.inf,
) -> PolicyTable:
    """The policy chosen on ``problems``: for each key of ``granularity``, the
    :func:`minimax` method (at ``power``) over the cells of those problems (of the key's
    families) at the key's guidance scales and NFEs. A family group none of ``problems``
    belongs to takes the choice made on all of them."""
    table: PolicyTable = {}
    cube = _cube(ratios, methods)
    for fams, ws, ns in granularity.keys():
        mine = [p for p in problems if family[p] in fams] or list(problems)
        cells = [(p, w, n) for p in mine for w in ws for n in ns if (p, w, n) in ratios]
        best = minimax(ratios, cells, cube.shortlist(cells, power), power)
        if best is None:
            raise ValueError(f"no method can run every cell of {fams}, {ws}, {ns}")
        for f, w, n in itertools.product(fams, ws, ns):
            table[(f, w, n)] = best[0]
    return table


def policy_ratios(
    table: PolicyTable, ratios: Ratios, family: Mapping[str, str], problems: Iterable[str]
) -> dict[Cell, float]:
    """The policy's ratio in every cell of ``problems``."""
    wanted = set(problems)
    return {c: ratios[c][table[(family[c[0]], c[1], c[2])]] for c in ratios if c[0] in wanted}


@dataclass(frozen=True)
class LeftOut:
    """One problem scored by the policy fitted on the others.

    Attributes:
        problem: the left-out problem.
        worst: its worst ratio, in ``cell``.
        geomean: the geometric mean of its ratios.
    """

    problem: str
    worst: float
    cell: Cell
    geomean: float


def leave_one_out(
    ratios: Ratios,
    family: Mapping[str, str],
    problems: Sequence[str],
    granularity: Granularity,
    methods: Sequence[str],
    power: float = math.inf,
) -> list[LeftOut]:
    """Fit on all of ``problems`` but one, score that one; for each."""
    out = []
    for p in problems:
        rest = [q for q in problems if q != p]
        table = fit(ratios, family, rest, granularity, methods, power)
        got = policy_ratios(table, ratios, family, [p])
        cell = max(got, key=lambda c: got[c])
        out.append(LeftOut(p, got[cell], cell, _geomean(got.values())))
    return out


@dataclass(frozen=True)
class Rule:
    """A selection rule: a granularity, and the power mean of the ratios over a key's
    training cells that the chosen recipe minimises (inf: the worst ratio).

    Attributes:
        granularity: which families, guidance scales and NFEs share a recipe.
        power: see :func:`power_mean`.
    """

    granularity: Granularity
    power: float

    @property
    def name(self) -> str:
        """For tables: the granularity, then the objective."""
        return f"{self.granularity.name}, {power_name(self.power)}"


def power_name(power: float) -> str:
    """``"worst ratio"``, ``"geometric mean"`` or ``"power mean p"``."""
    if power == math.inf:
        return "worst ratio"
    return "geometric mean" if power == 0 else f"power mean {power:g}"


#: The objectives leave-one-problem-out chooses among, from the worst ratio (minimax) to
#: the geometric mean. The worst cell of eight problems is one draw from a tail: two
#: recipes 6% apart there can be 60x apart on the next problem, and a power mean weighs
#: every large ratio instead of the single largest.
POWERS: tuple[float, ...] = (math.inf, 16.0, 8.0, 4.0, 2.0, 1.0, 0.0)

#: Every rule leave-one-problem-out chooses among.
RULES: list[Rule] = [Rule(g, p) for p in POWERS for g in GRANULARITIES]


def rule_named(name: str) -> Rule:
    """The rule of :data:`RULES` called ``name``."""
    for r in RULES:
        if r.name == name:
            return r
    raise ValueError(f"rule: unknown {name!r}")


#: Leave-one-out worst ratios within this factor of the smallest count as tied. The worst
#: left-out ratio is one cell's RMS error over 64 samples, and in the cells that decide it
#: a single sample carries it: resampling those 64 samples (``python -m
#: dpmsolver.bench.policy_noise``, ``benchmarks/policy_noise.md``) spreads it over a 5-95%
#: range of 10x and more. A rule
#: that is 6% better in that one cell is not measurably better.
TIE_BAND = 2.0


def loo_worsts(results: Sequence[LeftOut]) -> tuple[float, float]:
    """A rule's leave-one-out score: the worst left-out ratio and the geometric mean of
    the left-out problems' worst ratios."""
    worsts = [x.worst for x in results]
    return max(worsts), _geomean(worsts)


def choose_rule(
    ratios: Ratios,
    family: Mapping[str, str],
    problems: Sequence[str],
    methods: Sequence[str],
    rules: Sequence[Rule] = RULES,
    band: float = TIE_BAND,
) -> tuple[Rule, dict[str, list[LeftOut]]]:
    """Among the rules whose worst leave-one-problem-out ratio is within ``band`` of the
    smallest (:data:`TIE_BAND`), the one with the smallest geometric mean of the left-out
    problems' worst ratios (ties: fewer keys, then the larger power, i.e. the nearer to the
    worst case); and every rule's leave-one-out result."""
    if not band >= 1.0:
        raise ValueError(f"band: must be >= 1, got {band!r}")
    results = {
        r.name: leave_one_out(ratios, family, problems, r.granularity, methods, r.power)
        for r in rules
    }
    return pick_rule(rules, results, band), results


def pick_rule(
    rules: Sequence[Rule], results: Mapping[str, Sequence[LeftOut]], band: float = TIE_BAND
) -> Rule:
    """:func:`choose_rule`'s decision among ``rules``, from their leave-one-out results."""
    smallest = min(loo_worsts(results[r.name])[0] for r in rules)
    tied = [r for r in rules if loo_worsts(results[r.name])[0] <= band * smallest]

    def key(r: Rule) -> tuple[float, int, float]:
        return (loo_worsts(results[r.name])[1], len(r.granularity.keys()), -r.power)

    return min(tied, key=key)


# --------------------------------------------------------------------------------------
# The study: everything the markdown reports
# --------------------------------------------------------------------------------------


@dataclass
class Study:
    """Our errors and the peers', as ratios to each cell's best peer.

    Attributes:
        rows: our methods' rows.
        peers: the baseline's rows (every peer configuration's error per cell).
    """

    rows: list[ErrorRow]
    peers: list[BaselineRow]

    def __post_init__(self) -> None:
        best = {(r.problem, r.guidance, r.nfe): r.best_peer for r in self.peers}
        self.best_peer = best
        self.family = {r.problem: r.family for r in self.peers}
        self.split = {r.problem: r.split for r in self.peers}
        ratios: dict[Cell, dict[str, float]] = {c: {} for c in best}
        self.spent: dict[tuple[Cell, str], int] = {}
        self.worst_sample: dict[tuple[Cell, str], float] = {}
        for r in self.rows:
            c = (r.problem, r.guidance, r.nfe)
            if c not in best:
                continue
            ratios[c][r.method] = r.error / best[c] if math.isfinite(r.error) else math.inf
            self.spent[(c, r.method)] = r.spent
            self.worst_sample[(c, r.method)] = r.worst_sample
        self.ratios = ratios
        seen = {r.method for r in self.rows}
        self.candidates = [m for m in candidates() if m in seen]

    def problems(self, split: str) -> list[str]:
        """The problems of ``split`` in suite order."""
        return [p for p in dict.fromkeys(r.problem for r in self.peers) if self.split[p] == split]

    def peer_ratios(self, problems: Iterable[str]) -> dict[str, dict[Cell, float]]:
        """Each peer configuration's ratio in every cell of ``problems`` it ran."""
        wanted = set(problems)
        out: dict[str, dict[Cell, float]] = {}
        for r in self.peers:
            if r.problem not in wanted:
                continue
            for label, err in r.errors.items():
                ratio = err / r.best_peer if math.isfinite(err) else math.inf
                out.setdefault(label, {})[(r.problem, r.guidance, r.nfe)] = ratio
        return out

    def peer_worst(self, problems: Iterable[str]) -> dict[str, tuple[float, int, str]]:
        """Each peer configuration's worst ratio over the cells of ``problems`` it ran, the
        number of those cells and the worst one's family."""
        out: dict[str, tuple[float, int, str]] = {}
        for label, got in self.peer_ratios(problems).items():
            cell = max(got, key=lambda c: got[c])
            out[label] = (got[cell], len(got), self.family[cell[0]])
        return out


def beaten_on_own_cells(
    ours: Mapping[Cell, float], peers: Mapping[str, Mapping[Cell, float]]
) -> dict[str, tuple[float, float]]:
    """For each peer configuration, our worst ratio and its worst ratio over the cells it
    runs (a flow-only configuration is compared on flow cells only)."""
    return {label: (max(ours[c] for c in got), max(got.values())) for label, got in peers.items()}


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "inf"
    return f"{v:.3g}" if v < 1000 else f"{v:.2e}"


def _cell(c: Cell) -> str:
    return f"{c[0]} w={c[1]:g} NFE {c[2]}"


def recipe_table(table: PolicyTable, granularity: Granularity) -> list[tuple[str, str, str, str]]:
    """The policy compactly: (families, guidance, NFEs, method) per key."""
    out = []
    for fams, ws, ns in granularity.keys():
        out.append(
            (
                ",".join(fams),
                ",".join(f"{w:g}" for w in ws),
                ",".join(str(n) for n in ns),
                table[(fams[0], ws[0], ns[0])],
            )
        )
    return out


#: The table shipped at stop 20: this rule fitted on the suite's first eight selection
#: problems (kept to score it on the fresh rounds).
STOP20_RULE = "one table, w {1,3} {7.5,15}, any NFE, power mean 2"
STOP20_SELECTION = (
    "mix16-sd",
    "iso2-vplin",
    "lowrank64-cos",
    "ill256-edm",
    "iso1024-flow3",
    "lowrank32-flow",
    "lowrank512-sd",
    "ill3-vplin",
)


def _fresh_rounds(study: Study, chosen: Rule) -> list[str]:
    """Each fresh round's score on its problems: the rule this procedure chooses on the
    selection problems it had before them (``chosen``, the rule already chosen on the
    whole selection half, for the current round), the stop-20 table, the library default
    and the smallest worst of any peer configuration."""
    rounds = [*FRESH_ROUNDS, tuple(study.problems("fresh"))]
    stop20_rule = rule_named(STOP20_RULE)
    stop20 = fit(
        study.ratios,
        study.family,
        list(STOP20_SELECTION),
        stop20_rule.granularity,
        study.candidates,
        stop20_rule.power,
    )
    out = [
        "\n## Fresh rounds\n",
        "Each round's problems were defined before a rule was chosen without them and "
        "scored once; a finished round then joins the selection half. Each rule here is "
        "re-chosen by today's procedure (its candidates, granularities and powers) on the "
        "problems the selection half had before that round, so it can differ from the table "
        "shipped then (the README gives those scores). Worst ratio on the round's cells (the "
        "smallest worst of any peer configuration over the cells it runs, for comparison):\n",
        "| round | problems | rule chosen without them (selection problems) | its worst "
        "| the stop-20 table | library default | smallest peer configuration worst |",
        "|---|---|---|---|---|---|---|",
    ]
    sel = study.problems("selection")
    tables: list[tuple[int, str, PolicyTable]] = []
    for i, names in enumerate(rounds, 1):
        later = {p for r in rounds[i - 1 :] for p in r}
        before = [p for p in sel if p not in later]
        rule = (
            chosen
            if before == sel
            else choose_rule(study.ratios, study.family, before, study.candidates)[0]
        )
        fitted = fit(
            study.ratios, study.family, before, rule.granularity, study.candidates, rule.power
        )
        tables.append((len(before), rule.name, fitted))
        ours = policy_ratios(fitted, study.ratios, study.family, names)
        old = policy_ratios(stop20, study.ratios, study.family, names)
        default = [study.ratios[c][DEFAULT_LABEL] for c in ours]
        peer = min(v for v, _, _ in study.peer_worst(names).values())
        out.append(
            f"| {i} | {len(names)} | {rule.name} ({len(before)}) | {_fmt(max(ours.values()))} "
            f"| {_fmt(max(old.values()))} | {_fmt(max(default))} | {_fmt(peer)} |"
        )
    current = rounds[-1]
    out.append(
        f"\nThe last round ({len(current)} problems), scored by the table each round's rule "
        "made before it (how a table chosen on fewer problems does on the newest ones):\n"
    )
    out.append("| table chosen on | rule | worst on the last round | geo-mean |")
    out.append("|---|---|---|---|")
    for n, name, fitted in tables:
        got = policy_ratios(fitted, study.ratios, study.family, current)
        out.append(
            f"| {n} selection problems | {name} | {_fmt(max(got.values()))} "
            f"| {_fmt(_geomean(got.values()))} |"
        )
    held = study.problems("held_out")
    held_old = policy_ratios(stop20, study.ratios, study.family, held)
    out.append(
        f"\nThe stop-20 table on the held-out half: worst ratio {_fmt(max(held_old.values()))}.\n"
    )
    return out


def _scorecard(
    study: Study, table: PolicyTable, problems: Sequence[str], word: str
) -> tuple[str, list[str]]:
    """The policy ``table`` scored on ``problems`` (a split called ``word``): the CLAIM line
    and the markdown sections (against every peer configuration, on each one's own cells,
    per family and per problem)."""
    ours = policy_ratios(table, study.ratios, study.family, problems)
    worst_cell = max(ours, key=lambda c: ours[c])
    ours_worst = ours[worst_cell]
    peers = study.peer_worst(problems)
    best_peer = min(peers, key=lambda k: peers[k][0])
    others = {
        label: {c: v[label] for c, v in study.ratios.items() if c[0] in problems and label in v}
        for label in (DEFAULT_LABEL, PREVIOUS_LABEL)
    }
    peer_cells = study.peer_ratios(problems)
    own = beaten_on_own_cells(ours, peer_cells)
    below_own = [k for k, (ours_w, theirs) in own.items() if ours_w < theirs]
    verdict = "below" if all(ours_worst < v for v, _, _ in peers.values()) else "NOT below"
    claim = (
        f"CLAIM: {word} worst ratio {_fmt(ours_worst)} ({_cell(worst_cell)}), {verdict} "
        f"every single peer configuration's {word} worst ratio (the smallest: "
        f"{_fmt(peers[best_peer][0])}, {best_peer}, over the {peers[best_peer][1]} "
        f"{word} cells it can run); library default dpmpp_2m "
        f"{_fmt(max(others[DEFAULT_LABEL].values()))}; previous auto "
        f"{_fmt(max(others[PREVIOUS_LABEL].values()))}. On each peer configuration's own "
        f"{word} cells, our worst ratio is below its worst for {len(below_own)} of "
        f"{len(own)} configurations."
    )
    title = "Held-out half" if word == "held-out" else "Fresh problems"
    out = [f"### {title}: worst ratio, ours against every peer configuration\n"]
    out.append(
        f"Each peer configuration's worst ratio over the {word} cells it can run (a "
        "configuration that cannot spend a cell's NFE, or does not apply to the family, "
        f"does not count there; `cells` says how many of the {len(ours)} it covers). Ours "
        f"covers all {len(ours)}.\n"
    )
    out.append(f"| method | {word} worst | cells | worst cell's family |")
    out.append("|---|---|---|---|")
    entries = [
        ("**auto (this policy)**", ours_worst, len(ours), study.family[worst_cell[0]]),
    ]
    for label, got in others.items():
        c = max(got, key=lambda k: got[k])
        entries.append((label, got[c], len(got), study.family[c[0]]))
    for label, (v, n, fam) in peers.items():
        entries.append((label, v, n, fam))
    entries.sort(key=lambda e: e[1])
    for label, v, n, fam in entries:
        out.append(f"| {label} | {_fmt(v)} | {n} | {fam} |")
    out.append(f"\n### {title}: against each peer configuration on the cells it runs\n")
    out.append(
        "A configuration that covers only some cells (flow-only schedulers, singlestep "
        "solvers at odd NFE) is compared with our worst over the same cells. The "
        "configurations whose worst is not above ours:\n"
    )
    out.append("| method | cells | its worst | ours on those cells |")
    out.append("|---|---|---|---|")
    for label, (ours_w, theirs) in sorted(own.items(), key=lambda kv: kv[1][1]):
        if ours_w >= theirs:
            out.append(f"| {label} | {len(peer_cells[label])} | {_fmt(theirs)} | {_fmt(ours_w)} |")
    out.append(f"\n### {title}: per schedule family\n")
    out.append(
        "| family | ours worst | best peer configuration on these cells | its worst | "
        "library default | previous auto |"
    )
    out.append("|---|---|---|---|---|---|")
    for fam in FAMILIES:
        probs = [p for p in problems if study.family[p] == fam]
        if not probs:
            continue
        mine = [v for c, v in ours.items() if c[0] in probs]
        pw = study.peer_worst(probs)
        bp = min(pw, key=lambda k: pw[k][0])
        d = [v for c, v in others[DEFAULT_LABEL].items() if c[0] in probs]
        a = [v for c, v in others[PREVIOUS_LABEL].items() if c[0] in probs]
        out.append(
            f"| {fam} | {_fmt(max(mine))} | {bp} ({pw[bp][1]} cells) | {_fmt(pw[bp][0])} "
            f"| {_fmt(max(d))} | {_fmt(max(a))} |"
        )
    out.append(f"\n### {title}: per problem\n")
    out.append(
        "| problem | family | ours worst | in cell | ours geo-mean | library default "
        "worst | previous auto worst |"
    )
    out.append("|---|---|---|---|---|---|---|")
    for p in problems:
        per = {c: v for c, v in ours.items() if c[0] == p}
        c = max(per, key=lambda k: per[k])
        d = [v for k, v in others[DEFAULT_LABEL].items() if k[0] == p]
        a = [v for k, v in others[PREVIOUS_LABEL].items() if k[0] == p]
        out.append(
            f"| {p} | {study.family[p]} | {_fmt(per[c])} | {_cell(c)} "
            f"| {_fmt(_geomean(per.values()))} | {_fmt(max(d))} | {_fmt(max(a))} |"
        )
    return claim, out


def usable_cells(study: Study, problems: Iterable[str]) -> set[Cell]:
    """The cells of ``problems`` where the best peer configuration's RMS error is below the
    problem's data standard deviation: where some method ends within the data's own spread
    of the exact sample (the rule fixed before the eighth round,
    benchmarks/policy_round8.md). Elsewhere every method fails, and a ratio compares two
    failures."""
    wanted = set(problems)
    return {
        (r.problem, r.guidance, r.nfe)
        for r in study.peers
        if r.problem in wanted and r.best_peer < r.data_std
    }


def usable_scorecard(
    study: Study, table: PolicyTable, problems: Sequence[str], word: str
) -> list[str]:
    """The worst ratios of the policy ``table`` and of every peer configuration over the
    :func:`usable_cells` of ``problems`` only: a second number beside the scorecard's, not
    replacing it."""
    usable = usable_cells(study, problems)
    every = policy_ratios(table, study.ratios, study.family, problems)
    ours = {c: v for c, v in every.items() if c in usable}
    if not ours:
        return []
    peers = {
        label: {c: v for c, v in got.items() if c in usable}
        for label, got in study.peer_ratios(problems).items()
    }
    peers = {label: got for label, got in peers.items() if got}
    worst_cell = max(ours, key=lambda c: ours[c])
    own = beaten_on_own_cells(ours, peers)  # label: (ours, its worst) on its usable cells
    smallest = min(own, key=lambda k: own[k][1])
    verdict = "below" if all(ours[worst_cell] < w for _, w in own.values()) else "NOT below"
    below_own = sum(ours_w < theirs for ours_w, theirs in own.values())
    out = [f"### {word.capitalize()} problems, usable cells only\n"]
    out.append(
        f"The cells where the best peer configuration's RMS error is below the problem's data "
        f"standard deviation ({len(ours)} of {len(every)}); elsewhere every "
        "method ends farther from the exact sample than the data's own spread. A second "
        "number beside the one above, by a rule fixed before the eighth round "
        "(`benchmarks/policy_round8.md`).\n"
    )
    out.append(
        f"USABLE: {word} worst ratio over usable cells {_fmt(ours[worst_cell])} "
        f"({_cell(worst_cell)}), {verdict} every peer configuration's worst over its usable "
        f"cells (the smallest: {_fmt(own[smallest][1])}, {smallest}, over "
        f"{len(peers[smallest])} cells). On each configuration's own usable cells, our worst "
        f"is below its worst for {below_own} of {len(own)} configurations.\n"
    )
    out.append("| method | its worst | cells | ours on those cells |")
    out.append("|---|---|---|---|")
    for label, (ours_w, theirs) in sorted(own.items(), key=lambda kv: kv[1][1])[:5]:
        out.append(f"| {label} | {_fmt(theirs)} | {len(peers[label])} | {_fmt(ours_w)} |")
    out.append("\n(the five configurations with the smallest worst)\n")
    return out


def whole_suite(study: Study, table: PolicyTable) -> list[str]:
    """The issue's comparison turned round: each peer configuration whose worst ratio on its
    own held-out or fresh cells is not above ours, scored on the selection problems too (the
    ones a fixed choice is made on) and over the whole suite, and every configuration's
    whole-suite worst against ours. The CLAIM lines compare our worst with the smallest of
    the peer configurations' worsts on the very cells scored, a pick no one could make
    before seeing them."""
    splits = {s: study.problems(s) for s in ("selection", "held_out", "fresh")}
    everything = [p for ps in splits.values() for p in ps]
    ours = {s: policy_ratios(table, study.ratios, study.family, ps) for s, ps in splits.items()}
    theirs = {s: study.peer_ratios(ps) for s, ps in splits.items()}
    unbeaten = sorted(
        {
            label
            for s in ("held_out", "fresh")
            for label, got in theirs[s].items()
            if max(ours[s][c] for c in got) >= max(got.values())
        }
    )
    suite = study.peer_worst(everything)

    def worst(s: str, label: str) -> str:
        got = theirs[s].get(label, {})
        return f"{_fmt(max(got.values()))} ({_fmt(max(ours[s][c] for c in got))})" if got else "-"

    out = ["## The peer configurations the default does not beat, on every problem\n"]
    out.append(
        "The CLAIM lines compare our worst with the smallest of every peer configuration's "
        "worst on the very cells scored: a configuration picked after seeing them. A fixed "
        "configuration is picked before, as this table was, on the selection problems. Each "
        "configuration whose worst on its own held-out or fresh cells is not above ours, "
        "with its worst on each split's cells it runs (ours on the same cells in brackets) "
        "and over the whole suite:\n"
    )
    out.append("| configuration | held-out | fresh | selection | whole suite |")
    out.append("|---|---|---|---|---|")
    for label in unbeaten:
        out.append(
            f"| {label} | {worst('held_out', label)} | {worst('fresh', label)} "
            f"| {worst('selection', label)} | {_fmt(suite[label][0])} |"
        )
    best = min(suite, key=lambda k: suite[k][0])
    blind = max(max(ours["held_out"].values()), max(ours["fresh"].values()))
    fitted = max(ours["selection"].values())
    below = sum(blind < v for v, _, _ in suite.values())
    out.append(
        f"\nOver all {len(everything)} problems the smallest worst of the {len(suite)} peer "
        f"configurations is {_fmt(suite[best][0])} ({best}, over {suite[best][1]} cells). "
        f"Ours: {_fmt(blind)} on the held-out and fresh problems, which the table never saw; "
        f"{_fmt(fitted)} on the selection problems it was fitted on (in sample; the "
        f"leave-one-out worst above is the honest number there). Our blind worst is below "
        f"the whole-suite worst of {below} of {len(suite)} configurations; our worst over "
        f"the whole suite, in sample, {_fmt(max(blind, fitted))}, is "
        f"{'below' if max(blind, fitted) < suite[best][0] else 'NOT below'} every one of "
        "theirs.\n"
    )
    return out


def render(study: Study, *, note: str = "") -> str:
    """The markdown report: candidates, the leave-one-problem-out choice of granularity and
    its per-problem results, the policy, and the held-out comparison with every peer
    configuration, the library default and the previous ``auto``."""
    sel, held = study.problems("selection"), study.problems("held_out")
    fresh = study.problems("fresh")
    cands = study.candidates
    rule, loo = choose_rule(study.ratios, study.family, sel, cands)
    gran = rule.granularity
    table = fit(study.ratios, study.family, sel, gran, cands, rule.power)
    ours_held = policy_ratios(table, study.ratios, study.family, held)
    ours_sel = policy_ratios(table, study.ratios, study.family, sel)
    held_claim, held_lines = _scorecard(study, table, held, "held-out")
    fresh_claim, fresh_lines = _scorecard(study, table, fresh, "fresh") if fresh else ("", [])
    out = ['# `solver="auto"`: chosen for the worst case, scored on problems it never saw\n']
    out.append(
        "Ratio = our error / the best peer configuration's error in the same cell (problem, "
        "guidance scale, NFE): the oracle over all 42-60 diffusers / k-diffusion "
        "configurations of the cell (`benchmarks/suite_baseline.csv.gz`, 64 samples at each "
        "problem's default noise; our candidates ran on the same noise and labels, which a "
        f"rerun of `{CHECK_PEER}` at {CHECK_NFE} NFE checked in each problem and guidance "
        "scale). Worst = the largest ratio over the cells. Generated by "
        "`dpmsolver.bench.policy`; its docstring has the procedure.\n"
    )
    if note:
        out.append(f"{note}\n")
    out.append("## Claim\n")
    out.append(f"{held_claim}\n")
    if fresh_claim:
        out.append(
            f"On the {len(fresh)} fresh problems, which no choice looked at (see the fresh "
            "section):\n"
        )
        out.append(f"{fresh_claim}\n")
    # ---- candidates
    out.append(f"## Candidates ({len(cands)})\n")
    out.append(
        "Every solver of a group on every grid of the group, ending with the "
        "data-prediction step to sigma = 0 (sigma_end: the k-diffusion sigma of the last "
        "noisy knot; none: the schedule's own end).\n"
    )
    out.append("| group | solvers | grids | sigma_end |")
    out.append("|---|---|---|---|")
    present = set(cands)
    for group in CANDIDATE_GROUPS:
        if not present & set(_group_labels(group)):
            continue  # a record made before the group was added
        solvers = ", ".join(
            recipe_label(Recipe(n, dict(o))).split(" ")[0] for n, o in group.solvers
        )
        grids = ", ".join(f"{g}{'' if r is None else f' {r:g}'}" for g, r in group.grids)
        ends = ", ".join("none" if e is None else f"{e:g}" for e in group.ends)
        out.append(f"| {group.name} | {solvers} | {grids} | {ends} |")
    out.append(
        "\nA candidate that cannot spend a cell's NFE exactly cannot be chosen for it: "
        "singlestep solvers at even NFE, and on rectified flow at any NFE (their first step "
        "out of pure noise is planned at first order, so the budget is underspent).\n"
    )
    # ---- LOO choice of granularity
    out.append("## Leave-one-problem-out on the selection half\n")
    out.append(
        "A rule is a granularity (which families, guidance scales and NFEs share a recipe) "
        "and an objective: the power mean of a recipe's ratios over a key's cells that the "
        "chosen recipe minimises (power inf: its worst ratio; 0: the geometric mean). Each "
        f"of the {len(RULES)} rules is fitted on {len(sel) - 1} selection problems and "
        f"scored on the one left out, for each of the {len(sel)}. The rules whose worst "
        f"left-out ratio is within {TIE_BAND:g}x of the smallest are tied (that worst is one "
        "cell of 64 samples, in which one sample can decide: `benchmarks/policy_noise.md`); "
        f"among them the geometric mean of the {len(sel)} left-out worst ratios decides "
        "(then fewer keys, then the larger power). Per-family tables choose a family's recipe "
        "on the same-family problems left.\n"
    )

    def loo_key(r: Rule) -> tuple[float, float, int, float]:
        worst, geo = loo_worsts(loo[r.name])
        return (worst, geo, len(r.granularity.keys()), -r.power)

    def loo_line(r: Rule, first: str) -> str:
        res = loo[r.name]
        w = max(res, key=lambda x: x.worst)
        mark = " **(chosen)**" if r == rule else ""
        return (
            f"| {first}{mark} | {len(r.granularity.keys())} | {_fmt(w.worst)} "
            f"| {_fmt(_geomean(x.worst for x in res))} | {w.problem} |"
        )

    out.append("### The best granularity of each objective\n")
    out.append(
        f"Each objective's rule is chosen among its {len(GRANULARITIES)} granularities as "
        f"above. The last column fits it on all {len(sel)} selection problems and scores it "
        "on the held-out half; it is reported, never used to choose.\n"
    )
    out.append(
        f"| objective: granularity | keys | LOO worst | geo-mean of the {len(sel)} worst "
        "| worst problem | held-out worst |"
    )
    out.append("|---|---|---|---|---|---|")
    for power in POWERS:
        r = pick_rule([x for x in RULES if x.power == power], loo)
        fitted = fit(study.ratios, study.family, sel, r.granularity, cands, r.power)
        scored = policy_ratios(fitted, study.ratios, study.family, held)
        line = loo_line(r, f"{power_name(power)}: {r.granularity.name}")
        out.append(f"{line} {_fmt(max(scored.values()))} |")
    out.append(f"\n### Every granularity at the chosen objective ({power_name(rule.power)})\n")
    out.append(
        f"| granularity | keys | LOO worst | geo-mean of the {len(sel)} worst | worst problem |"
    )
    out.append("|---|---|---|---|---|")
    for r in sorted((x for x in RULES if x.power == rule.power), key=loo_key):
        out.append(loo_line(r, r.granularity.name))
    out.append(f"\n### Chosen: {rule.name}, per left-out problem\n")
    out.append("| left-out problem | family | worst ratio | in cell | geo-mean ratio |")
    out.append("|---|---|---|---|---|")
    for left in loo[rule.name]:
        out.append(
            f"| {left.problem} | {study.family[left.problem]} | {_fmt(left.worst)} "
            f"| {_cell(left.cell)} | {_fmt(left.geomean)} |"
        )
    out.append(
        f"| **all** | | **{_fmt(max(r.worst for r in loo[rule.name]))}** | | "
        f"{_fmt(_geomean(r.geomean for r in loo[rule.name]))} |\n"
    )
    out.append(
        "The rule was itself chosen by this table, so its leave-one-out numbers are "
        "slightly optimistic. The held-out half and the fresh problems below score it; the "
        "fresh problems are the unbiased score (the held-out half has been looked at each "
        "time the rule changed).\n"
    )
    # ---- the policy
    out.append(f"## The policy (fitted on all {len(sel)} selection problems)\n")
    out.append("| families | guidance | NFE | recipe | selection worst | held-out worst |")
    out.append("|---|---|---|---|---|---|")
    for fams, ws, ns in gran.keys():
        inside = [
            c for c in study.ratios if study.family[c[0]] in fams and c[1] in ws and c[2] in ns
        ]
        s = [ours_sel[c] for c in inside if c in ours_sel]
        h = [ours_held[c] for c in inside if c in ours_held]
        out.append(
            f"| {','.join(fams)} | {','.join(f'{w:g}' for w in ws)} "
            f"| {','.join(str(n) for n in ns)} | `{table[(fams[0], ws[0], ns[0])]}` "
            f"| {_fmt(max(s, default=math.nan))} | {_fmt(max(h, default=math.nan))} |"
        )
    out.append(f"\n## Held-out half ({len(held)} problems)\n")
    out += held_lines
    out += usable_scorecard(study, table, held, "held-out")
    if fresh:
        out.append(
            f"\n## Fresh problems ({len(fresh)}): the same scorecard on problems no one had "
            "looked at\n"
        )
        out.append(
            "The held-out half above was looked at each time the rule changed (stops 19-21), "
            "so it is no longer unseen. These problems were defined before this rule was "
            "chosen and measured after it was; nothing was changed once they were scored.\n"
        )
        out += fresh_lines
        out += usable_scorecard(study, table, fresh, "fresh")
        out += _fresh_rounds(study, rule)
        out += whole_suite(study, table)
    under = sum(1 for (c, m), s in study.spent.items() if m == PREVIOUS_LABEL and s != c[2])
    out.append(
        f"\nThe previous auto underspent its budget in {under} cells (its singlestep recipes "
        'on rectified flow); its error there is what `sample(solver="auto")` returned.\n'
    )
    return "\n".join(out) + "\n"


def recipe_source(recipe: Recipe) -> str:
    """``recipe`` as the Python expression :mod:`dpmsolver.auto` writes it."""

    def lit(v: Any) -> str:
        return f"Form.{v.name}" if isinstance(v, Form) else repr(v).replace("'", '"')

    opts = "{" + ", ".join(f'"{k}": {lit(v)}' for k, v in recipe.options.items()) + "}"
    args = [f'"{recipe.solver}"', opts, f'"{recipe.grid}"']
    if recipe.rho is not None:
        args.append(f"rho={recipe.rho!r}")
    if recipe.sigma_end is not None:
        args.append(f"sigma_end={recipe.sigma_end!r}")
    if recipe.step_limit is not None:
        args.append(f"step_limit={recipe.step_limit!r}")
    return f"Recipe({', '.join(args)})"


def auto_table_source(study: Study) -> str:
    """The rows of :mod:`dpmsolver.auto`'s table for the policy :func:`render` reports, each
    with its worst ratio over the selection and the held-out cells it covers."""
    sel, held = study.problems("selection"), study.problems("held_out")
    rule, _ = choose_rule(study.ratios, study.family, sel, study.candidates)
    gran = rule.granularity
    table = fit(study.ratios, study.family, sel, gran, study.candidates, rule.power)
    ours = policy_ratios(table, study.ratios, study.family, [*sel, *held])
    cands = candidates()
    lines = [f"# rule: {rule.name}"]
    for fams, ws, ns in gran.keys():
        inside = [c for c in ours if study.family[c[0]] in fams and c[1] in ws and c[2] in ns]
        s = max(ours[c] for c in inside if c[0] in sel)
        h = max(ours[c] for c in inside if c[0] in held)
        lines.append(
            f"    _Row({fams!r}, {ws!r}, {ns!r}, "
            f"{recipe_source(cands[table[(fams[0], ws[0], ns[0])]])}),"
            f"  # selection {_fmt(s)}, held out {_fmt(h)}".replace("'", '"')
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.policy [--quick] [--jobs N] [--out FILE.md]
    [--csv FILE.csv.gz] [--from-csv FILE.csv.gz]``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.policy", description=__doc__)
    ap.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} candidates")
    ap.add_argument("--jobs", type=int, default=1, help="processes (one problem each)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--csv", default=None, help="write every error here (.gz: gzipped)")
    ap.add_argument("--peers", default=PEERS_CSV, help=f"the peers' errors (default {PEERS_CSV})")
    ap.add_argument("--problems", default=None, help="comma-separated names (default: all 16)")
    ap.add_argument("--from-csv", default=None, help="re-render recorded errors; run nothing")
    ap.add_argument("--reuse", default=None, help="keep this CSV's rows; run only what it lacks")
    ap.add_argument("--cache", default=None, help="folder to keep the exact samples in")
    ap.add_argument(
        "--emit-table", action="store_true", help="print dpmsolver.auto's table rows and stop"
    )
    ap.add_argument(
        "--drop",
        default=None,
        help="with --from-csv: leave out the recorded methods whose label holds this text "
        "(e.g. 'step_limit=': the candidate set without the step limit)",
    )
    args = ap.parse_args(argv)
    peers = rows_from_csv(read_text(args.peers))
    command = command_line("dpmsolver.bench.policy", argv)
    if args.from_csv:
        rows, note = rows_from_text(read_text(args.from_csv))
        if args.drop:
            rows = [r for r in rows if args.drop not in r.method]
            note += f" Rendered without the methods whose label holds `{args.drop}`."
        if args.emit_table:
            print(auto_table_source(Study(rows, peers)))
            return 0
        text = render(Study(rows, peers), note=note)
    else:
        _quiet_diffusers()
        names = (
            [n.strip() for n in args.problems.split(",")]
            if args.problems
            else [p.name for p in suite_problems()]
        )
        reused, reused_note = rows_from_text(read_text(args.reuse)) if args.reuse else ([], "")
        start = time.perf_counter()
        rows = measure(
            names,
            labels=list(QUICK) if args.quick else None,
            peers=peers,
            jobs=args.jobs,
            reuse=reused,
            cache=args.cache,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
        minutes = (time.perf_counter() - start) / 60
        kept = {r.problem for r in reused} & set(names)
        note = (
            f"Command: `{command}`; took {minutes:.1f} min ({args.jobs} process(es), one "
            "thread each, on a shared 2-core machine)"
            + (
                f" for the {len(names) - len(kept)} problem(s) the `--reuse` file lacked; "
                f"its rows for the other {len(kept)} are kept as recorded there. {reused_note}"
                if kept
                else "."
            )
        )
        csv = rows_csv(rows, note)
        if args.csv:
            write_text(args.csv, csv)
        # render what the CSV holds (4 significant digits), as --from-csv will
        text = render(Study(rows_from_text(csv)[0], peers), note=note)
    publish(text, args.out)
    return 0


def _quiet_diffusers() -> None:
    """Diffusers' schedulers warn on every construction in some configurations."""
    from .peers import optional_import

    diffusers = optional_import("diffusers")
    if diffusers is not None:
        diffusers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    raise SystemExit(main())
