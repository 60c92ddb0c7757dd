"""Tuned ``solver="auto"`` (:func:`dpmsolver.tune`) on suite problems it never saw, against
the best peer configuration of every cell; and what tuning costs on the built-in model.

For every held-out suite problem (:func:`~.suite.suite_problems`) and guidance scale, the
exact mixture is presented as a network (:class:`~dpmsolver.analytic.MixtureNetwork`,
data prediction, null label = the number of classes) and tuned exactly as a user tunes
their own model: :func:`dpmsolver.tune` on ``problem.noise(128, seed=pilot_seed(problem))``
(a seed the baseline never used), labels cycling through the classes, every budget of the
baseline. Nothing else is fitted on these problems. The tuned profile then samples the
baseline's own test set -- ``problem.noise(64)`` and ``problem.labels(64)`` at the problem's
default seed -- through ``dpmsolver.sample(..., solver="auto", nfe=n, profile=profile)``,
and its RMS error against the exact sample is divided by the best peer configuration's
error in that cell (an oracle over every diffusers and k-diffusion configuration of
:mod:`.peer_suite`, read from ``benchmarks/suite_baseline.csv.gz``; one cell is re-run to
check the file).

The issue's targets: tuned <= best peer in every (guidance, NFE) cell, and <= 0.5x the best
peer at guidance 7.5 with 5-10 evaluations.

The cost measurement tunes the built-in digits model (eps prediction, Stable Diffusion's
schedule) at guidance 3 on 128 pilot noises for the 8 budgets, on ``--threads`` threads
(default 2), and records its network evaluations, seconds and the machine's load.

``python -m dpmsolver.bench.tuned [--quick] [--out benchmarks/tuned.md] [--csv ...]``
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import dataclasses
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..parameterization import Prediction
from ..tune import Profile, TuneOptions, tune
from .records import command_line, publish, read_text, write_text
from .rescore import KEEP, LEAST, RESAMPLES, conditioning, network, rescore, run_auto
from .suite import (
    FRESH_ROUNDS,
    GUIDANCE,
    NFES,
    BaselineRow,
    MixtureProblem,
    _rms,
    get_problem,
    rows_from_csv,
    suite_problems,
)

__all__ = [
    "BASELINE_CSV",
    "CostResult",
    "TunedRow",
    "evaluate",
    "main",
    "markdown",
    "measure_cost",
    "pilot_seed",
    "tune_problem",
    "verify_cell",
]

BASELINE_CSV = "benchmarks/suite_baseline.csv.gz"
#: Test samples per cell: the baseline's (its best-peer errors are on these).
TEST_BATCH = 64
PILOT = 128
#: The cell targets: tuned <= best peer everywhere; <= HALF x at guidance 7.5, 5-10 NFE.
HALF_GUIDANCE, HALF_NFES, HALF = 7.5, (5, 6, 8, 10), 0.5
#: A miss on the new noises is clear when tuned <= best peer in under this share of the
#: bootstrap resamples (a one-sided 5% level).
CLEAR = 0.05


def pilot_seed(problem: MixtureProblem) -> int:
    """The pilot's noise seed: not the problem's default (the test set's)."""
    return zlib.crc32(f"pilot:{problem.name}".encode())


def tune_problem(
    problem: MixtureProblem,
    guidance: float,
    *,
    pilot: int = PILOT,
    nfes: Sequence[int] = NFES,
    prediction: Prediction = "x0",
    **options: Any,
) -> Profile:
    """:func:`dpmsolver.tune` on the problem as a user's network (data prediction unless
    ``prediction`` says otherwise), on ``pilot`` noises of :func:`pilot_seed`."""
    noise = problem.noise(pilot, seed=pilot_seed(problem))
    return tune(
        network(problem, prediction),
        noise,
        schedule=problem.schedule,
        prediction=prediction,
        guidance_scale=guidance,
        nfe=nfes,
        **conditioning(problem, pilot),
        **options,
    )


@dataclass
class TunedRow:
    """One cell: a held-out problem, guidance scale and budget.

    Attributes:
        tuned: RMS error of the tuned profile's samples on the test set.
        untuned: the same with ``solver="auto"`` and no profile (the default policy).
        best_peer, best_label: the cell's best peer configuration (baseline CSV).
        spent, untuned_spent: evaluations the two runs made.
        stage, recipe: what the profile chose (``default``/``selection``/``steps``).
        pilot_heldout, pilot_default: the choice's and the default's error on the held-out
            half of the pilot.
        reference_error: the profile's reference error (two tolerances; per problem and
            guidance), best_candidate: the smallest held-out error among the profile's
            choices (the reference must be 10x below it).
        test_reference_error: the test reference's two-tolerance difference.
        tune_seconds, tune_evaluations: the whole profile's cost (all budgets).
        new_noises, new_tuned, new_best_peer, new_best_label, new_peers,
            new_reference_error, new_share: the cell re-scored on ``new_noises`` new
            noises (:class:`~.rescore.RescoreCell`; 0 and nan when it was not).
    """

    problem: str
    split: str
    family: str
    guidance: float
    nfe: int
    tuned: float
    untuned: float
    best_peer: float
    best_label: str
    spent: int
    untuned_spent: int
    stage: str
    recipe: str
    pilot_heldout: float
    pilot_default: float
    reference_error: float
    best_candidate: float
    test_reference_error: float
    tune_seconds: float
    tune_evaluations: int
    new_noises: int = 0
    new_tuned: float = math.nan
    new_best_peer: float = math.nan
    new_best_label: str = "-"
    new_peers: int = 0
    new_reference_error: float = math.nan
    new_share: float = math.nan

    @property
    def ratio(self) -> float:
        """tuned / best peer (inf if the tuned run went non-finite)."""
        return _ratio(self.tuned, self.best_peer)

    @property
    def new_ratio(self) -> float:
        """The same on the new noises (:mod:`.rescore`; nan when not re-scored)."""
        if self.new_noises == 0:
            return math.nan
        return _ratio(self.new_tuned, self.new_best_peer)


def _ratio(ours: float, peer: float) -> float:
    if not math.isfinite(ours):
        return math.inf
    return max(ours, 1e-300) / max(peer, 1e-300)


def _describe(profile: Profile, nfe: int, guidance: float) -> tuple[str, str]:
    c = profile.choice(nfe, guidance)
    if c is None:
        return "missing", "-"
    r = c.recipe
    if r.timesteps is None:
        return c.stage, r.describe()
    # cut at the grid's own bracket: an option's text (dpmv3's statistics) may hold one
    head = r.describe().split(f" [{r.grid}")[0]
    shifted = " + model-time shifts" if r.model_shifts is not None else ""
    shifted += " + compensation" if r.compensation is not None else ""
    shifted += " + correction" if r.correction is not None else ""
    shifted += f" + orders={''.join(map(str, r.orders))}" if r.orders is not None else ""
    shifted += f" + step limit {r.step_limit:.3g}" if r.step_limit is not None else ""
    return c.stage, f"{head} [fitted {len(r.timesteps)} knots]{shifted}"


def evaluate(
    problem: MixtureProblem,
    guidance: float,
    profile: Profile,
    peers: dict[tuple[str, float, int], BaselineRow],
    *,
    nfes: Sequence[int] = NFES,
    tune_seconds: float = math.nan,
) -> list[TunedRow]:
    """The profile on the baseline's test set, cell by cell, beside the best peer."""
    z = problem.noise(TEST_BATCH)
    check = problem.check_reference(
        problem.denoiser(guidance, problem.labels(TEST_BATCH)), problem.x_T(z)
    )
    if not check.passed:
        raise RuntimeError(
            f"{problem.name} w={guidance:g}: test reference off by {check.error:.1e}"
        )
    ref = check.sample
    best_candidate = min((c.heldout_error for c in profile.choices), default=math.nan)
    rows = []
    for n in nfes:
        out = []
        for prof in (profile, None):
            x, spent = run_auto(problem, guidance, z, prof, n)
            out.append((math.inf if x is None else _rms(x, ref), spent))
        peer = peers.get((problem.name, guidance, n))
        c = profile.choice(n, guidance)
        stage, recipe = _describe(profile, n, guidance)
        rows.append(
            TunedRow(
                problem.name,
                problem.split,
                problem.family,
                guidance,
                n,
                out[0][0],
                out[1][0],
                math.nan if peer is None else peer.best_peer,
                "-" if peer is None else peer.best_label,
                out[0][1],
                out[1][1],
                stage,
                recipe,
                math.nan if c is None else c.heldout_error,
                math.nan if c is None else c.default_heldout_error,
                profile.reference_error,
                best_candidate,
                check.error,
                profile.seconds if math.isnan(tune_seconds) else tune_seconds,
                profile.evaluations,
            )
        )
    return rows


def verify_cell(
    problem: MixtureProblem,
    guidance: float,
    nfe: int,
    peers: dict[tuple[str, float, int], BaselineRow],
) -> tuple[float, float, str]:
    """Re-run every peer configuration in one cell: (the CSV's best, the re-run's best,
    its label)."""
    from .peer_suite import run_peers

    y = problem.labels(TEST_BATCH)
    x_T = problem.x_T(problem.noise(TEST_BATCH))
    den = problem.denoiser(guidance, y)
    ref = problem.reference(den, x_T)
    errors = {
        r.label: _rms(r.sample, ref)
        for r in run_peers(problem, guidance, y, x_T, nfe, denoiser=den)
        if r.sample is not None
    }
    label, best = min(errors.items(), key=lambda kv: kv[1])
    return peers[(problem.name, guidance, nfe)].best_peer, best, label


@dataclass
class CostResult:
    """What tuning the built-in model cost."""

    pilot: int
    guidance: float
    nfes: tuple[int, ...]
    threads: int
    seconds: float
    evaluations: int
    reference_error: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    cpus: int
    profile: Profile
    device: str = "cpu"


def measure_cost(
    *,
    pilot: int = PILOT,
    guidance: float = 3.0,
    nfes: Sequence[int] = NFES,
    threads: int = 2,
    progress: bool = True,
    device: str = "cpu",
    **options: Any,
) -> CostResult:
    """Tune the built-in digits model (``dpmsolver.models.load_builtin``) on ``pilot``
    noises (seed 0) at one guidance scale for ``nfes``, on ``threads`` torch threads (so
    ``threads`` lanes of merged network calls: :func:`dpmsolver.tune`'s default), with the
    model and the pilot on ``device`` (on a GPU ``tune`` runs one budget at a time)."""
    from ..model import resolve_device
    from ..models import load_builtin

    dev = resolve_device(device, "--cost-device")
    model = load_builtin(dev)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # drawn on the CPU, so that every device tunes on the same pilot
        z = torch.randn(pilot, *model.shape, generator=torch.Generator().manual_seed(0))
        z = z.to(dev)
        labels = torch.arange(pilot, device=dev) % (model.num_classes or 1)
        cond = model.conditioning(labels, guidance)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        prof = tune(
            model.network,
            z,
            schedule=model.schedule,
            prediction=model.prediction,
            nfe=nfes,
            progress=progress,
            **cond,
            **options,
        )
        seconds = time.perf_counter() - t0
        load1 = os.getloadavg()
    finally:
        torch.set_num_threads(before)
    return CostResult(
        pilot,
        guidance,
        tuple(nfes),
        threads,
        seconds,
        prof.evaluations,
        prof.reference_error,
        load0,
        load1,
        os.cpu_count() or 0,
        prof,
        str(dev),
    )


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def _geomean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if len(finite) < len(values) or not finite:
        return math.inf
    return math.exp(sum(math.log(v) for v in finite) / len(finite))


def _f(v: float, digits: int = 2) -> str:
    if not math.isfinite(v):
        return "inf" if v > 0 else "-"
    return f"{v:.{digits}f}" if 0.01 <= abs(v) < 1000 else f"{v:.1e}"


def _meets(r: TunedRow) -> bool:
    return r.ratio <= 1.0


def _is_half_cell(r: TunedRow) -> bool:
    return r.guidance == HALF_GUIDANCE and r.nfe in HALF_NFES


Ratio = Callable[[TunedRow], float]


def _target_table(cells: Sequence[TunedRow], ratio: Ratio) -> list[str]:
    """The two targets' rows (met, missed, geo-mean, worst) for ``ratio``."""
    out = [
        "| target | cells | met | missed | geo-mean ratio | worst ratio |",
        "|---|---|---|---|---|---|",
    ]
    rs = [ratio(r) for r in cells]
    n_ok = sum(v <= 1.0 for v in rs)
    out.append(
        f"| tuned <= best peer (every cell) | {len(rs)} | {n_ok} | {len(rs) - n_ok} "
        f"| {_f(_geomean(rs))} | {_f(max(rs))} |"
    )
    half = [ratio(r) for r in cells if _is_half_cell(r)]
    if half:
        n_half = sum(v <= HALF for v in half)
        out.append(
            f"| tuned <= 0.5x best peer (guidance 7.5, NFE 5-10) | {len(half)} | {n_half} "
            f"| {len(half) - n_half} | {_f(_geomean(half))} | {_f(max(half))} |"
        )
    return out


def _cell_grid(cells: Sequence[TunedRow], ratio: Ratio) -> list[str]:
    """Per (guidance, NFE): worst / geo-mean ``ratio`` over the problems (met of all)."""
    guid = sorted({r.guidance for r in cells})
    nfes = sorted({r.nfe for r in cells})
    out = ["| guidance | " + " | ".join(f"NFE {n}" for n in nfes) + " |"]
    out.append("|---|" + "---|" * len(nfes))
    for w in guid:
        line = [f"| {w:g} "]
        for n in nfes:
            rs = [ratio(r) for r in cells if r.guidance == w and r.nfe == n]
            line.append(
                f"| {_f(max(rs))} / {_f(_geomean(rs))} ({sum(v <= 1.0 for v in rs)}/{len(rs)}) "
            )
        out.append("".join(line) + "|")
    return out


def _rescored(cells: Sequence[TunedRow]) -> list[str]:
    """The section on the new noises (:mod:`.rescore`), if the run had them."""
    new = [r for r in cells if r.new_noises > 0]
    if not new:
        return []
    n = new[0].new_noises
    both = sum(r.ratio <= 1 and r.new_ratio <= 1 for r in new)
    lost = sum(r.ratio <= 1 < r.new_ratio for r in new)
    won = sum(r.new_ratio <= 1 < r.ratio for r in new)
    out = [
        f"\n## The same profiles on {n} new noises\n",
        f"Every cell re-scored by `dpmsolver.bench.rescore`: the same profile on {n} noises "
        "of a third seed (neither the pilot's nor the test set's), against each peer "
        f"configuration that was within {KEEP:g}x of the cell's best on the test set (at "
        f"least the {LEAST} best), re-run on the same noises; the best of those is the new "
        "best peer. One or two of 64 test samples near a mode boundary can decide a cell, "
        "and the per-cell minimum over 42-60 configurations favours whichever configuration "
        "landed them; these are the same targets with that noise reduced.\n",
    ]
    out += _target_table(new, lambda r: r.new_ratio)
    out.append(
        f"\nOf the {len(new)} cells: {both} meet the best peer on both sets, {lost} only on "
        f"the test set, {won} only on the new noises, {len(new) - both - lost - won} on "
        "neither. Peer configurations re-run per cell: "
        f"{min(r.new_peers for r in new)}-{max(r.new_peers for r in new)}; largest "
        f"new-reference error {max(r.new_reference_error for r in new):.1e}.\n"
    )
    out += _cell_grid(new, lambda r: r.new_ratio)
    bad = sorted((r for r in new if r.new_ratio > 1), key=lambda r: -r.new_ratio)
    clear = [r for r in bad if not r.new_share >= CLEAR]
    out.append(f"\n### Cells where tuned > best peer on the new noises ({len(bad)})\n")
    out.append(
        f"Share: in how many of {RESAMPLES} paired bootstrap resamples of the {n} new noises "
        "tuned is <= that best peer (which is taken as given, not re-chosen per resample). "
        f"{len(clear)} of the {len(bad)} are clear misses (share under {CLEAR:g}); in the "
        "others a resample of the same size reverses the order at least that often.\n"
    )
    if bad:
        out.append(
            "| problem | w | NFE | tuned | best peer | ratio | share | on the test set "
            "| best peer configuration | tuned choice |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in bad:
            out.append(
                f"| {r.problem} | {r.guidance:g} | {r.nfe} | {r.new_tuned:.3e} "
                f"| {r.new_best_peer:.3e} | {_f(r.new_ratio)} | {r.new_share:.3f} "
                f"| {_f(r.ratio)} | {r.new_best_label} | {r.recipe} |"
            )
    return out


def markdown(rows: Sequence[TunedRow], cost: CostResult | None) -> str:
    """The held-out table (summary, per cell, per problem, failures, references, cost)."""
    out: list[str] = []
    cells = [r for r in rows if math.isfinite(r.best_peer)]
    guid = sorted({r.guidance for r in cells})
    nfes = sorted({r.nfe for r in cells})
    probs = list(dict.fromkeys(r.problem for r in cells))
    if cells:
        out.append("## Summary\n")
        out.append(
            "Ratio = tuned auto's RMS error / the best peer configuration's in the same cell "
            "(problem, guidance, NFE), on the baseline's 64 test samples; < 1: tuned is more "
            "accurate.\n"
        )
        out += _target_table(cells, lambda r: r.ratio)
        untuned = [r.untuned / r.best_peer for r in cells if r.untuned_spent == r.nfe]
        out.append(
            f'\nFor comparison, the untuned default `solver="auto"` on the same cells: '
            f"geo-mean ratio {_f(_geomean(untuned))} over the {len(untuned)} cells where it "
            f"spends exactly the budget, {sum(v <= 1 for v in untuned)} of them <= 1.\n"
        )
        out += _rescored(cells)
        out.append("\n## Per (guidance, NFE) cell over the problems\n")
        out.append(
            "Each entry: worst ratio / geometric-mean ratio over the problems, and how many "
            f"problems meet tuned <= best peer (of {len(probs)}).\n"
        )
        out += _cell_grid(cells, lambda r: r.ratio)
        out.append("\n## Per problem: tuned / best peer\n")
        for p in probs:
            rs = [r for r in cells if r.problem == p]
            out.append(f"\n### {p} ({rs[0].family})\n")
            out.append("| guidance | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
            out.append("|---|" + "---|" * len(nfes))
            for w in guid:
                by = {r.nfe: r for r in rs if r.guidance == w}
                out.append(
                    f"| {w:g} | "
                    + " | ".join(
                        (("**" + _f(by[n].ratio) + "**") if by[n].ratio > 1 else _f(by[n].ratio))
                        if n in by
                        else "-"
                        for n in nfes
                    )
                    + " |"
                )
        bad = sorted((r for r in cells if not _meets(r)), key=lambda r: -r.ratio)
        out.append(f"\n## Cells where tuned > best peer ({len(bad)})\n")
        if bad:
            out.append(
                "| problem | w | NFE | tuned | best peer | ratio | best peer configuration "
                "| tuned choice | stage | pilot held-out: choice / default |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|---|")
            for r in bad:
                out.append(
                    f"| {r.problem} | {r.guidance:g} | {r.nfe} | {r.tuned:.3e} "
                    f"| {r.best_peer:.3e} | {_f(r.ratio)} | {r.best_label} | {r.recipe} "
                    f"| {r.stage} | {r.pilot_heldout:.2e} / {r.pilot_default:.2e} |"
                )
        out.append("\n## Reference accuracy and tuning cost per problem and guidance\n")
        out.append(
            "The profile's reference error is the RMS difference between its exact-ODE "
            "solves at two tolerances; the best candidate is the smallest held-out error "
            "among the profile's choices (the reference must be at least 10x below it).\n"
        )
        out.append(
            "| problem | w | reference error | best candidate | margin | test reference "
            "error | tune s | tune evaluations (sample rows) "
            "| stages (default/selection/steps/shifts) |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for p in probs:
            for w in guid:
                rs = [r for r in cells if r.problem == p and r.guidance == w]
                if not rs:
                    continue
                r = rs[0]
                kinds = ("default", "selection", "steps", "shifts")
                st = [sum(x.stage == s for x in rs) for s in kinds]
                out.append(
                    f"| {p} | {w:g} | {r.reference_error:.1e} | {r.best_candidate:.1e} "
                    f"| {r.best_candidate / max(r.reference_error, 1e-300):.0f}x "
                    f"| {r.test_reference_error:.1e} | {r.tune_seconds:.0f} "
                    f"| {r.tune_evaluations} | {'/'.join(map(str, st))} |"
                )
        out.append("\n## Every cell\n")
        out.append(
            "| problem | w | NFE | tuned | untuned auto | best peer | ratio | tuned choice "
            "| stage | best peer configuration |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in cells:
            out.append(
                f"| {r.problem} | {r.guidance:g} | {r.nfe} | {r.tuned:.3e} | {r.untuned:.3e}"
                f"{'' if r.untuned_spent == r.nfe else f' ({r.untuned_spent} NFE)'} "
                f"| {r.best_peer:.3e} | {_f(r.ratio)} | {r.recipe} | {r.stage} | {r.best_label} |"
            )
    if cost is not None:
        out.append("\n## Tuning cost on the built-in model\n")
        out.append(cost_markdown(cost))
    return "\n".join(out) + "\n"


def _device_name(device: str) -> str:
    """``device`` with the GPU's name where it is a CUDA device."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def cost_markdown(cost: CostResult) -> str:
    """The cost measurement as markdown."""
    lines = [
        f"`dpmsolver.tune` on the built-in digits model (eps prediction, SD schedule, null "
        f"label 10), guidance {cost.guidance:g}, {cost.pilot} pilot noises, budgets "
        f"{', '.join(map(str, cost.nfes))}, "
        + (
            f"{cost.threads} threads (the reference on {cost.threads} intra-op threads, "
            f"then every budget side by side, their network calls merged in "
            f"{cost.threads} lanes of one thread each; `TuneOptions.merge_lanes`)"
            if cost.device == "cpu" and cost.threads > 1
            else "1 thread (one budget at a time)"
            if cost.device == "cpu"
            else f"on {_device_name(cost.device)} (one budget at a time)"
        )
        + ": "
        f"**{cost.seconds / 60:.1f} min** ({cost.seconds:.0f} s), {cost.evaluations} network "
        f"evaluations (sample rows; the reference included); reference error "
        f"{cost.reference_error:.1e}. Load average (1, 5, 15 min) before "
        f"{', '.join(f'{v:.1f}' for v in cost.load_before)}, after "
        f"{', '.join(f'{v:.1f}' for v in cost.load_after)} on {cost.cpus} CPUs.\n",
        "| NFE | choice | stage | held-out error | default's | evaluations | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cost.profile.choices:
        stage, recipe = _describe(cost.profile, c.nfe, c.guidance_scale)
        lines.append(
            f"| {c.nfe} | {recipe} | {stage} | {c.heldout_error:.3e} "
            f"| {c.default_heldout_error:.3e} | {c.evaluations} | {c.seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


CSV_FIELDS = tuple(f.name for f in dataclasses.fields(TunedRow))


def _moved(a: float, b: float) -> bool:
    """Whether two runs' ratios differ by more than run-to-run noise: the same recipe rerun
    moves the test-set ratio in the 13th digit (summation order) and the new-noise ratio by
    up to 6.4e-4 of itself (the fresh problems, stops 28 and 30), not by 1e-3."""
    return not math.isclose(a, b, rel_tol=1e-3) and not (math.isnan(a) and math.isnan(b))


def _tally(pairs: Sequence[tuple[TunedRow, TunedRow]], ratio: Ratio) -> str:
    """One line of :func:`comparison`: cells met by each run and, over the changed cells,
    how many got better or worse and their geometric-mean ratios."""
    met_a = sum(ratio(a) <= 1.0 for a, _ in pairs)
    met_b = sum(ratio(b) <= 1.0 for _, b in pairs)
    changed = [(a, b) for a, b in pairs if _moved(ratio(a), ratio(b))]
    better = sum(ratio(b) < ratio(a) for a, b in changed)
    geo_a = _geomean([ratio(a) for a, _ in changed]) if changed else math.nan
    geo_b = _geomean([ratio(b) for _, b in changed]) if changed else math.nan
    return (
        f"| {len(pairs)} | {met_a} | {met_b} | {len(changed)} | {better} "
        f"| {len(changed) - better} | {_f(geo_a, 3)} | {_f(geo_b, 3)} |"
    )


def _spread(pairs: Sequence[tuple[TunedRow, TunedRow]], ratio: Ratio) -> str:
    """One line of :func:`comparison`'s second table: the changed cells' moves beyond 2x and
    4x either way, the largest move for the worse, and the cells at half the best peer's
    error of each run: the half target's (guidance 7.5, NFE 5-10), then every cell."""
    moves = [
        (ratio(b) / ratio(a), b)
        for a, b in pairs
        if _moved(ratio(a), ratio(b)) and ratio(a) > 0 and math.isfinite(ratio(a))
    ]
    counts = [
        sum(m < 1 / f for m, _ in moves) if better else sum(m > f for m, _ in moves)
        for f in (2.0, 4.0)
        for better in (True, False)
    ]
    worst = max(moves, key=lambda e: e[0], default=None)
    most = (
        "-"
        if worst is None or worst[0] <= 1
        else (f"{_f(worst[0])}x ({worst[1].problem}, w={worst[1].guidance:g}, {worst[1].nfe} NFE)")
    )

    def at_half_of(cells: Sequence[tuple[TunedRow, TunedRow]]) -> list[int]:
        return [sum(ratio(r) <= 0.5 for r in side) for side in zip(*cells, strict=True)] or [0, 0]

    at_half = at_half_of([(a, b) for a, b in pairs if _is_half_cell(b)])
    everywhere = at_half_of(pairs)
    return (
        f"| {counts[0]} | {counts[1]} | {counts[2]} | {counts[3]} | {most} "
        f"| {at_half[0]} | {at_half[1]} | {everywhere[0]} | {everywhere[1]} |"
    )


def comparison(base: Sequence[TunedRow], new: Sequence[TunedRow]) -> str:
    """Two runs of the same cells side by side (``--compare``): met cells, and the cells
    whose ratio changed, on the test set and, where both were re-scored, on the new noises.
    Cells of one run only are left out (their count is said)."""
    index = {(r.problem, r.guidance, r.nfe): r for r in base}
    pairs = [(index[k], r) for r in new if (k := (r.problem, r.guidance, r.nfe)) in index]
    out = [
        "| set | cells | met (base) | met (new) | changed | better | worse "
        "| geo-mean changed (base) | geo-mean changed (new) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out.append("| test set " + _tally(pairs, lambda r: r.ratio))
    rescored = [(a, b) for a, b in pairs if a.new_noises > 0 and b.new_noises > 0]
    if rescored:
        out.append("| new noises " + _tally(rescored, lambda r: r.new_ratio))
    out.append(
        f"\n{len(pairs)} cells in both runs ({len(base) - len(pairs)} only in the base run, "
        f"{len(new) - len(pairs)} only in the new one).\n"
    )
    out += [
        "How far the changed cells moved (new error / base error), and the cells at half the "
        "best peer's error (guidance 7.5, NFE 5-10; then every cell of both runs):\n",
        "| set | over 2x better | over 2x worse | over 4x better | over 4x worse "
        "| the most worse | at half (base) | at half (new) | every cell at half (base) "
        "| every cell at half (new) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| test set " + _spread(pairs, lambda r: r.ratio),
    ]
    if rescored:
        out.append("| new noises " + _spread(rescored, lambda r: r.new_ratio))
    out.append("")
    moved = [
        (a, b) for a, b in pairs if _moved(a.ratio, b.ratio) or _moved(a.new_ratio, b.new_ratio)
    ]
    if moved:
        out.append(
            "| problem | w | NFE | test set (base) | test set (new) | new noises (base) "
            "| new noises (new) | base choice | new choice |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for a, b in moved:
            out.append(
                f"| {a.problem} | {a.guidance:g} | {a.nfe} | {_f(a.ratio)} | {_f(b.ratio)} "
                f"| {_f(a.new_ratio)} | {_f(b.new_ratio)} | {a.recipe} | {b.recipe} |"
            )
    return "\n".join(out) + "\n"


def _rows_of(paths: str) -> list[TunedRow]:
    """The rows of comma-separated tuned-benchmark CSVs, in order; a cell (problem,
    guidance, NFE) an earlier file holds replaces the same cell in later ones (a run of
    some budgets updates a record of all of them)."""
    seen: set[tuple[str, float, int]] = set()
    out = []
    for p in paths.split(","):
        rows = rows_from_tuned_csv(read_text(p.strip()))
        out += [r for r in rows if (r.problem, r.guidance, r.nfe) not in seen]
        seen |= {(r.problem, r.guidance, r.nfe) for r in rows}
    return out


def rows_csv(rows: Sequence[TunedRow]) -> str:
    """Every cell as CSV."""
    lines = [",".join(CSV_FIELDS)]
    for r in rows:
        vals = [getattr(r, k) for k in CSV_FIELDS]
        lines.append(",".join(str(v).replace(",", ";") for v in vals))
    return "\n".join(lines) + "\n"


def rows_from_tuned_csv(text: str) -> list[TunedRow]:
    """The rows :func:`rows_csv` wrote."""
    lines = text.strip().splitlines()
    header = tuple(lines[0].split(","))
    # files written before the re-scoring columns existed end at tune_evaluations
    if header not in (CSV_FIELDS, CSV_FIELDS[: CSV_FIELDS.index("new_noises")]):
        raise ValueError("not a tuned-benchmark CSV (header differs)")
    out = []
    types = {f.name: f.type for f in dataclasses.fields(TunedRow)}
    for line in lines[1:]:
        vals: dict[str, Any] = {}
        for k, v in zip(header, line.split(","), strict=True):
            t = types[k]
            vals[k] = float(v) if t == "float" else int(v) if t == "int" else v
        out.append(TunedRow(**vals))
    return out


def _job(
    args: tuple[str, float, int, tuple[int, ...], dict[str, Any], int, Prediction, bool],
) -> tuple[list[TunedRow], list[TunedRow], str]:
    name, w, pilot, nfes, options, new_noises, flow_prediction, unlimited = args
    torch.set_num_threads(1)
    p = get_problem(name)
    assert isinstance(p, MixtureProblem)
    peers = {(r.problem, r.guidance, r.nfe): r for r in rows_from_csv(read_text(BASELINE_CSV))}
    t0 = time.perf_counter()
    prediction: Prediction = flow_prediction if p.family == "flow" else "x0"
    prof = tune_problem(p, w, pilot=pilot, nfes=nfes, prediction=prediction, **options)
    took = time.perf_counter() - t0
    rows, line = _scored(p, w, prof, peers, nfes, took, new_noises)
    line = f"{name} w={w:g}: tuned in {took:.0f} s, {line}"
    off: list[TunedRow] = []
    if unlimited:
        bare = without_calibrated_limits(prof)
        off, off_line = _scored(p, w, bare, peers, nfes, took, new_noises)
        line += f"; without the calibrated step limits: {off_line}"
    return rows, off, line


def without_calibrated_limits(profile: Profile) -> Profile:
    """``profile`` with the step limits :attr:`dpmsolver.TuneOptions.step_limit_margin`
    calibrated and the envelopes :attr:`~dpmsolver.TuneOptions.envelope_margin` calibrated
    removed (the choices and every other field as they are): the same profile as tuned
    without the calibrations, since neither changes a choice."""
    choices = tuple(
        dataclasses.replace(
            c.with_recipe(
                step_limit=None if c.pilot_correction is not None else c.recipe.step_limit,
                step_envelope=None,
                envelope_persistence=1,
            ),
            pilot_correction=None,
        )
        for c in profile.choices
    )
    return dataclasses.replace(profile, choices=choices)


def _scored(
    p: MixtureProblem,
    w: float,
    prof: Profile,
    peers: dict[tuple[str, float, int], BaselineRow],
    nfes: tuple[int, ...],
    took: float,
    new_noises: int,
) -> tuple[list[TunedRow], str]:
    """The profile's cells on the test set (and on ``new_noises`` new noises), and a line
    for the log."""
    rows = evaluate(p, w, prof, peers, nfes=nfes, tune_seconds=took)
    line = f"worst ratio {max(r.ratio for r in rows):.2f}"
    if new_noises:
        t1 = time.perf_counter()
        new = {c.nfe: c for c in rescore(p, w, prof, peers, n=new_noises, nfes=nfes)}
        rows = [
            dataclasses.replace(
                r,
                new_noises=new_noises,
                new_tuned=new[r.nfe].tuned,
                new_best_peer=new[r.nfe].best_peer,
                new_best_label=new[r.nfe].best_label,
                new_peers=new[r.nfe].peers,
                new_reference_error=new[r.nfe].reference_error,
                new_share=new[r.nfe].share,
            )
            for r in rows
        ]
        line += (
            f"; on {new_noises} new noises {max(r.new_ratio for r in rows):.2f} "
            f"({time.perf_counter() - t1:.0f} s)"
        )
    return rows, line


def tune_settings(items: Sequence[str]) -> dict[str, Any]:
    """``--set OPTION=VALUE`` items as :func:`dpmsolver.tune` options (VALUE a Python
    literal), checked against :class:`dpmsolver.TuneOptions` so that a misspelt study fails
    before an hour of tuning."""
    names = {f.name for f in dataclasses.fields(TuneOptions)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise SystemExit(
                f"--set {item!r}: expected OPTION=VALUE with OPTION one of {sorted(names)}"
            )
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {item!r}: VALUE must be a Python literal") from None
    TuneOptions(**out)  # the values' own checks
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.tuned``: the held-out table and the cost measurement."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.tuned", description=__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2 problems, w=7.5, NFE 5 and 10, pilot 16",
    )
    ap.add_argument("--split", choices=("selection", "held_out", "fresh"), default="held_out")
    ap.add_argument("--problems", default=None, help="comma-separated names (default: the split)")
    ap.add_argument(
        "--fresh-round",
        type=int,
        default=None,
        metavar="K",
        help="the problems of finished fresh round K (suite.FRESH_ROUNDS; 2: the records' "
        "'fresh' problems, the split's until stop 38)",
    )
    ap.add_argument("--guidance", default=None, help="comma-separated (default 1,3,7.5,15)")
    ap.add_argument("--nfe", default=None, help="comma-separated (default 5,...,25)")
    ap.add_argument("--pilot", type=int, default=None, help=f"pilot noises (default {PILOT})")
    ap.add_argument("--jobs", type=int, default=1, help="processes, one thread each (default 1)")
    ap.add_argument("--cost-threads", type=int, default=2, help="threads of the cost run (2)")
    ap.add_argument(
        "--cost-device", default="cpu", help="device of the cost run: cpu, cuda, cuda:N (cpu)"
    )
    ap.add_argument("--no-cost", action="store_true", help="skip the built-in model's cost")
    ap.add_argument("--cost-only", action="store_true", help="only the built-in model's cost")
    ap.add_argument(
        "--verify",
        default=None,
        help="a cell PROBLEM,W,NFE to re-run peers (default: the first problem, 7.5, 8)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="a dpmsolver.tune option for every tuning (repeatable; a study: e.g. "
        "--set shift_rows=32); the value is a Python literal",
    )
    ap.add_argument(
        "--rescore",
        type=int,
        default=0,
        metavar="N",
        help="also score every cell on N new noises against the test set's best peer "
        "configurations re-run there (dpmsolver.bench.rescore; default 0: off)",
    )
    ap.add_argument(
        "--flow-prediction",
        choices=("x0", "flow"),
        default="x0",
        help="what a rectified-flow problem's network predicts (default x0, as every record; "
        "flow: velocity, as flow models do, so that stage (c)'s time shifts act on it)",
    )
    ap.add_argument(
        "--unlimited-csv",
        default=None,
        help="also score each profile with its calibrated step limits and envelopes removed "
        "(without_calibrated_limits; a paired study of TuneOptions.step_limit_margin or "
        "envelope_margin) and write those cells here",
    )
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument(
        "--csv",
        default=None,
        help="write every cell here (.gz: gzipped); with --from-csv, the joined cells",
    )
    ap.add_argument(
        "--from-csv",
        default=None,
        help="re-render a run's CSV (no cost section; comma-separated files are joined, a "
        "cell in an earlier file replacing the same cell in later ones)",
    )
    ap.add_argument(
        "--compare",
        default=None,
        help="with --from-csv: compare that run with this one (CSV, comma-separated files "
        "joined) cell by cell instead",
    )
    args = ap.parse_args(argv)
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    command = command_line("dpmsolver.bench.tuned", argv)
    if args.compare and not args.from_csv:
        ap.error("--compare needs --from-csv (the new run)")
    given_nfes = tuple(int(v) for v in args.nfe.split(",")) if args.nfe else None
    given_guid = tuple(float(v) for v in args.guidance.split(",")) if args.guidance else None
    if args.from_csv:
        run = _rows_of(args.from_csv)
        # --guidance / --nfe, where given, keep only those cells of the re-rendered run
        if given_guid is not None:
            run = [r for r in run if r.guidance in given_guid]
        if given_nfes is not None:
            run = [r for r in run if r.nfe in given_nfes]
        if args.csv:  # the joined run, e.g. a record with some problems re-run
            write_text(args.csv, rows_csv(run))
        page = comparison(_rows_of(args.compare), run) if args.compare else markdown(run, None)
        publish(page, args.out)
        return 0
    torch.set_num_threads(1)
    pilot = args.pilot or (16 if args.quick else PILOT)
    nfes = given_nfes or ((5, 10) if args.quick else NFES)
    guid = given_guid or ((7.5,) if args.quick else GUIDANCE)
    if args.problems:
        names = [n.strip() for n in args.problems.split(",")]
    elif args.fresh_round is not None:
        if not 1 <= args.fresh_round <= len(FRESH_ROUNDS):
            ap.error(f"--fresh-round must be 1 to {len(FRESH_ROUNDS)}, got {args.fresh_round}")
        names = list(FRESH_ROUNDS[args.fresh_round - 1])
    elif args.quick:
        names = ["iso2-sd", "iso8-flow"] if args.split == "held_out" else ["mix16-sd", "ill3-vplin"]
    else:
        names = [p.name for p in suite_problems(args.split)]
    options: dict[str, Any] = {}
    if args.quick:
        options = {"fine_knots": 24, "refine_runs": 10, "screen_rows": 8}
    options |= tune_settings(args.set)
    rows: list[TunedRow] = []
    verified = ""
    if not args.cost_only:
        peers = {(r.problem, r.guidance, r.nfe): r for r in rows_from_csv(read_text(BASELINE_CSV))}
        unlimited = args.unlimited_csv is not None
        jobs = [
            (n, w, pilot, nfes, options, args.rescore, args.flow_prediction, unlimited)
            for n in names
            for w in guid
        ]
        off: list[TunedRow] = []
        if args.jobs > 1:
            with concurrent.futures.ProcessPoolExecutor(args.jobs) as ex:
                for got, got_off, line in ex.map(_job, jobs):
                    rows += got
                    off += got_off
                    log(line)
        else:
            for job in jobs:
                got, got_off, line = _job(job)
                rows += got
                off += got_off
                log(line)
        order = {(n, w): i for i, (n, w, *_) in enumerate(jobs)}
        rows.sort(key=lambda r: (order[(r.problem, r.guidance)], r.nfe))
        off.sort(key=lambda r: (order[(r.problem, r.guidance)], r.nfe))
        if args.csv:
            write_text(args.csv, rows_csv(rows))
        if unlimited:
            write_text(args.unlimited_csv, rows_csv(off))
        if not args.quick:
            vname, vw, vn = (args.verify or f"{names[0]},7.5,8").split(",")
            vp = get_problem(vname)
            assert isinstance(vp, MixtureProblem)
            t0 = time.perf_counter()
            csv_best, rerun, label = verify_cell(vp, float(vw), int(vn), peers)
            verified = (
                f"Baseline check: every peer configuration re-run in the cell {vname}, w={vw}, "
                f"NFE {vn}: best {rerun:.4e} ({label}); the CSV says {csv_best:.4e} "
                f"({time.perf_counter() - t0:.0f} s).\n"
            )
            log(verified.strip())
    held_seconds = time.perf_counter() - start
    cost = None
    if not args.no_cost:
        cost = measure_cost(
            pilot=16 if args.quick else PILOT,
            nfes=(5, 10) if args.quick else NFES,
            threads=args.cost_threads,
            device=args.cost_device,
            **options,
        )
        log(f"cost: {cost.seconds:.0f} s, {cost.evaluations} evaluations")
    total = time.perf_counter() - start
    split_words = {"held_out": "held-out"}.get(args.split, args.split)
    text = (
        f'# Tuned solver="auto" on the {split_words} suite problems, against the best peer\n\n'
        + (__doc__ or "")
        .split("\n\n")[1]
        .replace("\n", " ")
        .replace("every held-out suite problem", f"every {split_words} suite problem")
        + "\n\n"
        f"Command: `{command}`; took {total / 60:.1f} min ({held_seconds / 60:.1f} min for the "
        f"problems, {args.jobs} process(es) of one thread; the rest the cost run) on a shared "
        f"machine of {os.cpu_count()} CPUs. Pilot {pilot} noises per (problem, guidance); "
        f"budgets {', '.join(map(str, nfes))}; guidance {', '.join(f'{w:g}' for w in guid)}."
        + (" Quick settings: a smoke run, not the measurement." if args.quick else "")
        + "\n\n"
        + verified
        + "\n"
        + markdown(rows, cost)
    )
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
