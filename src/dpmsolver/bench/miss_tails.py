"""Where a tuned profile's misses on new noises come from: a few samples, or the many.

The tuned benchmark's re-scoring (:mod:`.rescore`) says, per cell, whether the tuned profile's
RMS error on 512 new noises is above the best peer configuration's there (the hindsight
oracle). RMS error is a mean of squares: on a mixture, a sample near a mode boundary that a
recipe sends to the wrong mode ends a mode spacing away, and one such sample in 512 can
outweigh the other 511. This module takes the misses of a re-scored record, tunes each cell
again exactly as the record did (:func:`.tuned.tune_problem`; the error must reproduce the
record's), samples the same new noises with the profile and with the cell's best peer, and
splits each one's squared error into its ``k`` largest samples and the rest:

- *top-k share*: the fraction of a run's summed squared error carried by its ``k`` worst
  samples;
- *trimmed*: both runs' RMS errors over the samples outside the union of their ``k`` worst
  (the same samples for both, so the comparison stays paired).

A miss whose top-k share is large and whose trimmed ratio is below 1 is a miss of a few
rare samples that the peer's configuration, chosen on these very noises, happened to land;
one whose trimmed ratio is above 1 is a miss on the typical sample. Nothing is chosen from
this measurement.

``python -m dpmsolver.bench.miss_tails --tuned benchmarks/tuned_g.csv.gz --jobs 2
--out benchmarks/miss_tails.md``
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .calibrated_peer import _Draw, _geo
from .peer_suite import peer_configs, run_peers
from .records import command_line, publish, read_text
from .rescore import _sq, rescore_seed, run_auto
from .suite import MixtureProblem, _rms, get_problem
from .tuned import TunedRow, rows_from_tuned_csv, tune_problem

__all__ = ["TOP", "MissTail", "main", "markdown", "misses", "split_tails"]

#: The number of worst samples split off by default.
TOP = 5
#: A cell's error reproduces the record's if within this relative difference.
SAME = 1e-6


@dataclass(frozen=True)
class MissTail:
    """One missed cell split into its worst samples and the rest (module docstring).

    Attributes:
        record: the record's tuned error on the new noises (``tuned`` must reproduce it).
        tuned, peer: the RMS errors on all the new noises; ``peer_label`` the configuration.
        tuned_share, peer_share: the top-k shares of each run's summed squared error.
        tuned_trimmed, peer_trimmed: both RMS errors outside the union of their top k.
    """

    problem: str
    guidance: float
    nfe: int
    record: float
    tuned: float
    peer: float
    peer_label: str
    tuned_share: float
    peer_share: float
    tuned_trimmed: float
    peer_trimmed: float

    @property
    def reproduced(self) -> bool:
        """Whether the re-tuned profile's error is the record's."""
        return abs(self.tuned - self.record) <= SAME * max(abs(self.record), 1e-300)


def split_tails(ours: torch.Tensor, theirs: torch.Tensor, k: int) -> tuple[float, ...]:
    """From two runs' per-sample squared errors on the same samples: each one's top-``k``
    share of its summed squared error, then both RMS errors over the samples outside the
    union of their ``k`` largest."""
    if ours.shape != theirs.shape or ours.ndim != 1:
        raise ValueError(f"expected two equal 1-D tensors, got {ours.shape} and {theirs.shape}")
    if not 1 <= k < len(ours) // 2:
        raise ValueError(f"k must be in [1, {len(ours) // 2}), got {k}")
    keep = torch.ones(len(ours), dtype=torch.bool, device=ours.device)
    shares = []
    for sq in (ours, theirs):
        top = sq.topk(k).indices
        keep[top] = False
        shares.append(float(sq[top].sum() / sq.sum()))
    return (*shares, float(ours[keep].mean().sqrt()), float(theirs[keep].mean().sqrt()))


def misses(rows: Sequence[TunedRow], max_share: float = 1.0) -> list[TunedRow]:
    """The re-scored cells where tuned's new-noise error is above the best peer's there,
    with a bootstrap share (:attr:`.rescore.RescoreCell.share`) at most ``max_share``."""
    return [
        r
        for r in rows
        if r.new_noises > 0 and r.new_tuned > r.new_best_peer and not r.new_share > max_share
    ]


def _job(
    name: str, guidance: float, cells: tuple[tuple[int, str, float], ...], n: int, k: int
) -> list[MissTail]:
    torch.set_num_threads(1)
    problem = get_problem(name)
    if not isinstance(problem, MixtureProblem):
        raise TypeError(f"{name} is not an exact mixture problem")
    profile = tune_problem(problem, guidance, nfes=sorted(c[0] for c in cells), merge_lanes=0)
    z = problem.noise(n, seed=rescore_seed(problem))
    new = _Draw(problem, guidance, z)
    ref = new.reference
    configs = {c.label: c for c in peer_configs(problem.family)}
    out = []
    for nfe, label, record in cells:
        x, _ = run_auto(problem, guidance, z, profile, nfe)
        config = [configs[label]]
        runs = run_peers(
            problem, guidance, new.labels, new.x_T, nfe, configs=config, denoiser=new.den
        )
        peer = runs[0].sample
        if x is None or peer is None:
            raise RuntimeError(f"{name} w={guidance:g} NFE {nfe}: a run went non-finite")
        ours, theirs = _sq(x, ref), _sq(peer, ref)
        shares = split_tails(ours, theirs, k)
        out.append(
            MissTail(name, guidance, nfe, record, _rms(x, ref), _rms(peer, ref), label, *shares)
        )
    return out


def markdown(tails: Sequence[MissTail], k: int, command: str, minutes: float) -> str:
    """The record: a summary of how many misses are a few samples' and every cell."""
    few = [t for t in tails if t.tuned_trimmed <= t.peer_trimmed]
    heavy = [t for t in tails if t.tuned_share >= 0.5]
    out = [
        "# Where the tuned profile's misses on new noises come from",
        "",
        (__doc__ or "").split("``python -m")[0].strip(),
        "",
        f"Command: `{command}`; took {minutes:.1f} min on a shared machine of 2 CPUs.",
        "",
        f"k = {k}. Reproduced the record's tuned error: "
        f"{sum(t.reproduced for t in tails)} of {len(tails)} cells.",
        "",
        "| misses | tuned's top-k share >= 0.5 | trimmed tuned <= trimmed peer "
        "| both | geo-mean ratio (all samples) | geo-mean ratio (trimmed) |",
        "|---|---|---|---|---|---|",
        f"| {len(tails)} | {len(heavy)} | {len(few)} "
        f"| {sum(1 for t in heavy if t in few)} "
        f"| {_geo([t.tuned / t.peer for t in tails]):.2f} "
        f"| {_geo([t.tuned_trimmed / t.peer_trimmed for t in tails]):.2f} |",
        "",
        "| problem | w | NFE | tuned | peer | ratio | tuned top-k share | peer top-k share "
        "| trimmed tuned | trimmed peer | trimmed ratio | peer configuration |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted(tails, key=lambda t: -t.tuned / t.peer):
        out.append(
            f"| {t.problem} | {t.guidance:g} | {t.nfe} | {t.tuned:.3e} | {t.peer:.3e} "
            f"| {t.tuned / t.peer:.2f} | {t.tuned_share:.2f} | {t.peer_share:.2f} "
            f"| {t.tuned_trimmed:.3e} | {t.peer_trimmed:.3e} "
            f"| {t.tuned_trimmed / t.peer_trimmed:.2f} | {t.peer_label} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.miss_tails``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.miss_tails")
    ap.add_argument("--tuned", required=True, help="a tuned-benchmark CSV with --rescore")
    ap.add_argument(
        "--max-share",
        type=float,
        default=1.0,
        help="misses with a bootstrap share at most this (default 1: every miss; 0.05: the clear "
        "ones)",
    )
    ap.add_argument("--top", type=int, default=TOP, help=f"k worst samples (default {TOP})")
    ap.add_argument("--jobs", type=int, default=1, help="processes, one thread each")
    ap.add_argument("--out", default=None, help="the markdown record")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = rows_from_tuned_csv(read_text(args.tuned))
    cells = misses(rows, args.max_share)
    if not cells:
        ap.error("--tuned: no re-scored miss in the record")
    keys = list(dict.fromkeys((r.problem, r.guidance) for r in cells))
    n = cells[0].new_noises
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {
            key: pool.submit(
                _job,
                *key,
                tuple(
                    (r.nfe, r.new_best_label, r.new_tuned)
                    for r in cells
                    if (r.problem, r.guidance) == key
                ),
                n,
                args.top,
            )
            for key in keys
        }
        tails: list[MissTail] = []
        for key, f in futures.items():
            tails += f.result()
            print(f"{key[0]} w={key[1]:g} done", file=sys.stderr, flush=True)
    command = command_line("dpmsolver.bench.miss_tails", argv)
    text = markdown(tails, args.top, command, (time.perf_counter() - t0) / 60)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
