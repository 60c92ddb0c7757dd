"""Two tuned records' CSVs (``python -m dpmsolver.bench.tuned --csv``) compared cell by
cell, as the rules of the stage studies read them (benchmarks/stage_g_refit.md): on the
512 new noises and on the test set, the cells meeting the best peer, the cells over 2x it,
the cells at or below half of it (every cell, and guidance 7.5 at 5-10 NFE), and the cells
whose error changed by more than a relative 1e-6 (the merged network calls move the last
bits of cells a stage leaves alone), with their geometric mean ratio and how many moved over
4x either way; the cells that crossed the peer or twice it, or moved over 4x, on the new
noises; then the largest relative difference in the cells where neither recipe has a
correction (the validity check of a correction study).

``python benchmarks/compare_records.py OFF.csv.gz ON.csv.gz [--nfe 5,6,8,10]``
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math

Key = tuple[str, str, str]


def load(path: str) -> dict[Key, dict[str, str]]:
    with gzip.open(path, "rt") as f:
        return {(r["problem"], r["guidance"], r["nfe"]): r for r in csv.DictReader(f)}


def count(
    run: dict[Key, dict[str, str]],
    cells: list[Key],
    columns: tuple[str, str],
    factor: float,
    over: bool = False,
) -> int:
    """The cells whose error (``columns``: the error's and the best peer's) is at most
    ``factor`` times the peer's, or over it where ``over``."""
    err, peer = columns
    ratios = [float(run[k][err]) / float(run[k][peer]) for k in cells]
    return sum((r > factor) if over else (r <= factor) for r in ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("off")
    parser.add_argument("on")
    parser.add_argument("--nfe", help="comma-separated budgets (default: every cell)")
    args = parser.parse_args()
    off, on = load(args.off), load(args.on)
    budgets = None if args.nfe is None else set(args.nfe.split(","))
    keys = [k for k in off if k in on and (budgets is None or k[2] in budgets)]
    half_target = [k for k in keys if k[1] == "7.5" and k[2] in ("5", "6", "8", "10")]
    target = f"at or below half, guidance 7.5 at 5-10 NFE ({len(half_target)} cells)"
    lines = (
        ("meeting the best peer", keys, 1.0, False),
        ("over 2x the peer", keys, 2.0, True),
        ("at or below half, every cell", keys, 0.5, False),
        (target, half_target, 0.5, False),
    )
    for label, err, peer in (
        ("new noises", "new_tuned", "new_best_peer"),
        ("test set", "tuned", "best_peer"),
    ):
        moved = [float(on[k][err]) / float(off[k][err]) for k in keys]
        moved = [m for m in moved if abs(math.log(m)) > 1e-6]
        geo = math.exp(sum(map(math.log, moved)) / len(moved)) if moved else 1.0
        print(f"{label}: {len(keys)} cells (OFF -> ON)")
        for name, cells, factor, over in lines:
            before = count(off, cells, (err, peer), factor, over)
            print(f"  {name}: {before} -> {count(on, cells, (err, peer), factor, over)}")
        if moved:
            print(
                f"  changed: {len(moved)} ({sum(m < 1 for m in moved)} better), geo-mean "
                f"ON/OFF {geo:.3f} ({min(moved):.2f}x to {max(moved):.2f}x), over 4x better "
                f"{sum(m < 0.25 for m in moved)}, over 4x worse {sum(m > 4 for m in moved)}"
            )
    print("cells crossing the best peer or 2x it, or moving over 4x, on the new noises:")
    for k in keys:
        a, b = (float(r[k]["new_tuned"]) / float(r[k]["new_best_peer"]) for r in (off, on))
        if (a <= 1) != (b <= 1) or (a > 2) != (b > 2) or not 0.25 <= b / a <= 4:
            stages = f"{off[k]['stage']} -> {on[k]['stage']}"
            print(f"  {k[0]} w={k[1]} {k[2]} NFE: {a:.2f}x -> {b:.2f}x the peer ({stages})")
    plain = [k for k in keys if "correction" not in off[k]["recipe"] + on[k]["recipe"]]
    dev = max(
        (abs(float(on[k]["new_tuned"]) / float(off[k]["new_tuned"]) - 1) for k in plain),
        default=0.0,
    )
    print(
        f"cells where neither recipe has a correction: {len(plain)}, largest relative "
        f"difference {dev:.1e}"
    )


if __name__ == "__main__":
    main()
