"""Where ``dpmsolver.tune``'s time goes, stage by stage, on the built-in model.

Runs the cost measurement of ``python -m dpmsolver.bench.tuned --cost-only`` (guidance 3,
128 pilot noises, 8 budgets, 2 threads) with every network call of the row denoiser timed
and credited to the stage that made it: the function of :mod:`dpmsolver.tune` that
``_tune_budget`` (or ``_pilot``, for the reference) called on the way to it, past the
functions that only pass a stage on (:data:`DISPATCH`), read from the call stack. Prints a
markdown table of thread-seconds, sample rows, rows per call and milliseconds per row (two
network rows each under guidance); the budgets run two at a time, so the wall time is about
half the budgets' thread-seconds plus the reference's. The timing wrapper adds one stack
walk per call (a few microseconds against milliseconds).

``--forward`` instead times the built-in U-Net's forward at several batch sizes, eager and
frozen, on one thread and two (the network's own speed, without tune).

Usage: python benchmarks/tune_stages.py [--forward]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import threading
import time
from typing import Any

import torch

from dpmsolver.tune.stages import LATE_STAGES

# the stage a call is credited to: (caller of the network call's chain, under the top)
STAGES = {
    "_tail_ranked": "tail ranking (finalists from the guard's noises)",
    "_shift": "(c) model-time shifts",
    "_refine": "(b) knot refinement, and its fit's pilot run",
    "_oss_knots": "(b) dynamic programming",
    "_compensate": "(f) compensation",
    "_screened": "(a) screening",
    "_choice": "(a) finalists and later stages' pilot runs",
    "<listcomp>": "(a) finalists and later stages' pilot runs",
    "run": "(b) the fitted knots' pilot runs",
    "_guarded": "guard blow-up counts, tail check, walk-back",
    "_tail_checked": "guard blow-up counts, tail check, walk-back",
    "_walked_back": "guard blow-up counts, tail check, walk-back",
}
REFERENCE = "reference, its check and the step search's trajectories"
#: What ``_tune_budget`` calls to reach a stage's work (stage (a)'s finalists, stage (b), the
#: later stages' offers, the guard and tail check): a call is credited past them, to the
#: function doing the work, as when ``_tune_budget`` called that function itself.
DISPATCH = frozenset(
    {"_finalists", "_fitted_steps", "_kept", *(offer.__name__ for offer, _ in LATE_STAGES)}
)


def stage_table() -> str:
    """The cost run with its network calls credited to stages, as markdown."""
    from dpmsolver.bench.tuned import measure_cost
    from dpmsolver.tune.pilot import _RowDenoiser

    package = os.path.dirname(_RowDenoiser.__call__.__code__.co_filename)  # dpmsolver/tune

    stats: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
    lock = threading.Lock()
    call = _RowDenoiser.__call__

    def stage() -> str:
        frame, chain = sys._getframe(2), []
        while frame is not None:
            if os.path.dirname(frame.f_code.co_filename) == package:
                chain.append(frame.f_code.co_name)
                if frame.f_code.co_name in ("_tune_budget", "_pilot", "tune"):
                    break
            frame = frame.f_back
        if chain[-1] != "_tune_budget":
            return REFERENCE
        callee = next((name for name in reversed(chain[:-1]) if name not in DISPATCH), "")
        return STAGES.get(callee, "other")

    def timed(self, x, knot, rows=None):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = call(self, x, knot, rows)
        seconds = time.perf_counter() - t0
        with lock:
            s = stats[stage()]
            s[0] += seconds
            s[1] += x.shape[0]
            s[2] += 1
        return out

    _RowDenoiser.__call__ = timed
    try:
        cost = measure_cost(progress=False)
    finally:
        _RowDenoiser.__call__ = call
    total = sum(s[0] for s in stats.values())
    lines = [
        f"{cost.seconds:.0f} s, {cost.evaluations} evaluations; network calls "
        f"{total:.0f} thread-s\n",
        "| stage | thread-s | share | rows | rows/call | ms/row |",
        "|---|---|---|---|---|---|",
    ]
    for name, (seconds, rows, calls) in sorted(stats.items(), key=lambda e: -e[1][0]):
        lines.append(
            f"| {name} | {seconds:.0f} | {100 * seconds / total:.1f}% | {rows:.0f} "
            f"| {rows / calls:.0f} | {1e3 * seconds / rows:.2f} |"
        )
    return "\n".join(lines)


def forward_table(sizes: tuple[int, ...] = (16, 64, 256, 512), repeats: int = 3) -> str:
    """The built-in U-Net's forward, eager (its modules called from Python) and frozen (the
    graph its CPU inference runs, :mod:`dpmsolver.digits.frozen`): milliseconds per network
    row on one thread, and with two threads calling it at once as tune's two budgets do
    (wall time over both threads' rows); each the median of ``repeats`` alternating
    timings. Also the floating-point operations per second of the frozen one-thread call
    (torch's FLOP counter, on the eager modules)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dpmsolver.digits.load import load_default_model

    torch.set_num_threads(1)
    net = load_default_model()
    x, t, y = torch.randn(8, 1, 8, 8), torch.full((8,), 500.0), torch.arange(8) % 11
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net._core(x, t, y)
    flops = counter.get_total_flops() / 8
    conv = counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution, 0) / 8
    calls = {"eager": net._core, "frozen": net}

    def per_row(fn: Any, b: int, threads: int) -> float:
        x, t, y = torch.randn(b, 1, 8, 8), torch.full((b,), 500.0), torch.arange(b) % 11
        n = max(4, 1024 // b)

        def work() -> None:
            with torch.no_grad():
                for _ in range(n):
                    fn(x, t, y)

        work()  # warm-up (and the frozen graph's build)
        pool = [threading.Thread(target=work) for _ in range(threads)]
        t0 = time.perf_counter()
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        return (time.perf_counter() - t0) / (n * b * threads)

    lines = [
        f"{flops / 1e6:.1f} MFLOP per row, {100 * conv / flops:.0f}% in convolutions\n",
        "| rows | eager, 1 thread | frozen, 1 thread | eager, 2 threads | frozen, 2 threads "
        "| frozen 1-thread GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for b in sizes:
        times: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
        for _ in range(repeats):
            for threads in (1, 2):
                for name, fn in calls.items():
                    times[name, threads].append(per_row(fn, b, threads))
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        lines.append(
            f"| {b} | {ms['eager', 1]:.2f} | {ms['frozen', 1]:.2f} | {ms['eager', 2]:.2f} "
            f"| {ms['frozen', 2]:.2f} | {flops / ms['frozen', 1] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--forward", action="store_true", help="time the U-Net's forward only")
    args = ap.parse_args()
    print(forward_table() if args.forward else stage_table())


if __name__ == "__main__":
    main()
