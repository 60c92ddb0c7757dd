"""Tuned ``solver="auto"`` against a peer user who calibrates too.

The tuned benchmark (:mod:`.tuned`) compares each cell with the best of 42-60 diffusers and
k-diffusion configurations *on the very samples scored*: an oracle no user has. A user of
those libraries who calibrates as :func:`dpmsolver.tune` does would run every peer
configuration on the same 128 pilot noises (the tuned benchmark's pilot seed, labels
cycling through the classes) against the exact ODE solution, take per cell the one with
the smallest RMS error over all 128 (no held-out half: the peer gets all the data), and
sample with it. This module does that and scores the pick on the 512 new noises of
:func:`.rescore.rescore_seed` (neither the pilot's nor the test set's), where the tuned
record (``--tuned``, a CSV of :mod:`.tuned` with ``--rescore 512``) already scored the
tuned profile and the hindsight oracle. Nothing is chosen from this measurement.

``python -m dpmsolver.bench.calibrated_peer --tuned benchmarks/tuned.csv.gz --jobs 2
--out benchmarks/calibrated_peer.md --csv benchmarks/calibrated_peer.csv.gz``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from .peer_suite import peer_configs, run_peers
from .records import command_line, publish, read_text, write_text
from .rescore import rescore_seed
from .suite import MixtureProblem, _rms, get_problem
from .tuned import HALF, HALF_GUIDANCE, HALF_NFES, PILOT, TunedRow, pilot_seed, rows_from_tuned_csv

__all__ = ["PeerPick", "calibrate_peers", "main", "markdown"]


@dataclass(frozen=True)
class PeerPick:
    """One cell: the peer configuration with the smallest pilot error, and its error on the
    new noises (``new``), beside the tuned profile's and the hindsight oracle's there."""

    problem: str
    family: str
    guidance: float
    nfe: int
    label: str
    pilot_error: float
    new: float
    tuned_new: float
    oracle_new: float
    oracle_label: str


def calibrate_peers(
    problem: MixtureProblem, guidance: float, nfes: Sequence[int], new_noises: int
) -> list[tuple[int, str, float, float]]:
    """Per budget: the peer configuration with the smallest RMS error over the pilot, that
    error, and its RMS error on ``new_noises`` noises of :func:`.rescore.rescore_seed`."""
    torch.set_num_threads(1)
    picks = []
    pilot = _Draw(problem, guidance, problem.noise(PILOT, seed=pilot_seed(problem)))
    new = _Draw(problem, guidance, problem.noise(new_noises, seed=rescore_seed(problem)))
    for nfe in nfes:
        errors = {
            r.label: _rms(r.sample, pilot.reference)
            for r in run_peers(problem, guidance, pilot.labels, pilot.x_T, nfe, denoiser=pilot.den)
            if r.sample is not None
        }
        errors = {k: v for k, v in errors.items() if math.isfinite(v)}
        if not errors:
            picks.append((nfe, "-", math.inf, math.inf))
            continue
        label = min(errors, key=lambda k: errors[k])
        config = [c for c in peer_configs(problem.family) if c.label == label]
        (res,) = run_peers(
            problem, guidance, new.labels, new.x_T, nfe, configs=config, denoiser=new.den
        )
        err = math.inf if res.sample is None else _rms(res.sample, new.reference)
        picks.append((nfe, label, errors[label], err))
    return picks


class _Draw:
    """Noises with their labels, guided denoiser, start states and checked exact sample."""

    def __init__(self, problem: MixtureProblem, guidance: float, z: torch.Tensor) -> None:
        self.labels = problem.labels(z.shape[0])
        self.den = problem.denoiser(guidance, self.labels)
        self.x_T = problem.x_T(z)
        check = problem.check_reference(self.den, self.x_T)
        if not check.passed:
            raise RuntimeError(f"{problem.name} w={guidance:g}: reference off by {check.error:.1e}")
        self.reference = check.sample


def _job(
    name: str, guidance: float, nfes: tuple[int, ...], n: int
) -> list[tuple[int, str, float, float]]:
    problem = get_problem(name)
    if not isinstance(problem, MixtureProblem):
        raise TypeError(f"{name} is not an exact mixture problem")
    return calibrate_peers(problem, guidance, nfes, n)


def _geo(xs: Sequence[float]) -> float:
    v = [x for x in xs if math.isfinite(x) and x > 0]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else math.nan


def markdown(picks: Sequence[PeerPick], command: str, minutes: float) -> str:
    """The record: the targets against the calibrated peer and against the oracle."""
    half = [p for p in picks if p.guidance == HALF_GUIDANCE and p.nfe in HALF_NFES]

    def line(name: str, cells: Sequence[PeerPick], bound: float, other: str) -> str:
        r = [p.tuned_new / getattr(p, other) for p in cells]
        met = sum(x <= bound for x in r)
        return f"| {name} | {len(r)} | {met} | {len(r) - met} | {_geo(r):.2f} | {max(r):.3g} |"

    head = (
        "| target | cells | met | missed | geo-mean ratio | worst ratio |\n"
        "|---|---|---|---|---|---|"
    )
    gap = [p.new / p.oracle_new for p in picks]
    out = [
        "# Tuned auto against a peer user who calibrates on the same pilot",
        "",
        (__doc__ or "").split("``python -m")[0].strip(),
        "",
        f"Command: `{command}`; took {minutes:.1f} min on a shared machine of 2 CPUs.",
        "",
    ]
    sections: tuple[tuple[str, str, str, list[str]], ...] = (
        ("calibrated peer", "new", "the calibrated peer (the peer configuration best on the 128"
         " pilot noises)", ["Ratio = tuned's RMS error / the calibrated peer's, both on the 512"
                           " new noises.", ""]),
        ("oracle", "oracle_new", "the hindsight oracle (the best peer on the new noises"
         " themselves)", []),
    )  # fmt: skip
    for name, other, title, intro in sections:
        out += [f"## Against {title}", "", *intro, head]
        out.append(line(f"tuned <= {name} (every cell)", picks, 1.0, other))
        out += [line(f"tuned <= {HALF}x {name} (guidance 7.5, NFE 5-10)", half, HALF, other), ""]
    out += [
        f"The calibrated peer's own error / the oracle's: geo-mean {_geo(gap):.2f}, worst "
        f"{max(gap):.3g}; it is the oracle's configuration in "
        f"{sum(p.label == p.oracle_label for p in picks)} of {len(picks)} cells.",
        "",
        "## Cells where tuned > the calibrated peer",
        "",
        "| problem | w | NFE | tuned | calibrated peer | ratio | its configuration | oracle |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worse = sorted((p for p in picks if p.tuned_new > p.new), key=lambda p: -p.tuned_new / p.new)
    for p in worse:
        out.append(
            f"| {p.problem} | {p.guidance:g} | {p.nfe} | {p.tuned_new:.3e} | {p.new:.3e} | "
            f"{p.tuned_new / p.new:.2f} | {p.label} | {p.oracle_new:.3e} ({p.oracle_label}) |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.calibrated_peer``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.calibrated_peer")
    ap.add_argument("--tuned", required=True, help="a tuned-benchmark CSV with --rescore")
    ap.add_argument("--problems", default=None, help="comma-separated (default: the CSV's)")
    ap.add_argument("--jobs", type=int, default=1, help="processes, one thread each")
    ap.add_argument("--out", default=None, help="the markdown record")
    ap.add_argument("--csv", default=None, help="every cell (.gz: gzipped)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[TunedRow] = rows_from_tuned_csv(read_text(args.tuned))
    if any(r.new_noises == 0 for r in rows):
        ap.error("--tuned: every cell needs the new-noise scores (a run with --rescore N)")
    names = (
        args.problems.split(",") if args.problems else list(dict.fromkeys(r.problem for r in rows))
    )
    rows = [r for r in rows if r.problem in names]
    keys = sorted({(r.problem, r.guidance) for r in rows}, key=lambda k: (names.index(k[0]), k[1]))
    nfes = {k: tuple(sorted(r.nfe for r in rows if (r.problem, r.guidance) == k)) for k in keys}
    n = rows[0].new_noises
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {k: pool.submit(_job, k[0], k[1], nfes[k], n) for k in keys}
        got = {}
        for k, f in futures.items():
            got[k] = f.result()
            print(f"{k[0]} w={k[1]:g} done", file=sys.stderr, flush=True)
    by_cell = {(r.problem, r.guidance, r.nfe): r for r in rows}
    picks = []
    for k in keys:
        for nfe, label, pilot_err, new_err in got[k]:
            row = by_cell[(k[0], k[1], nfe)]
            picks.append(
                PeerPick(
                    k[0],
                    row.family,
                    k[1],
                    nfe,
                    label,
                    pilot_err,
                    new_err,
                    row.new_tuned,
                    row.new_best_peer,
                    row.new_best_label,
                )
            )
    command = command_line("dpmsolver.bench.calibrated_peer", argv)
    text = markdown(picks, command, (time.perf_counter() - t0) / 60)
    if args.csv:
        names_ = [f.name for f in fields(PeerPick)]
        lines = [",".join(names_)] + [
            ",".join(str(getattr(p, f)).replace(",", ";") for f in names_) for p in picks
        ]
        write_text(args.csv, "\n".join(lines) + "\n")
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
