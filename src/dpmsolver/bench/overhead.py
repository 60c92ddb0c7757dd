"""Per-step solver overhead, excluding the network, against diffusers.

Three runs of DPM-Solver++(2M) (midpoint, data prediction, diffusers' default "linspace"
timesteps of Stable Diffusion's schedule, final step to sigma = 0) for ``steps`` steps on
the same latent tensor, with a "network" that costs nothing (it returns a fixed tensor),
so the time measured is the sampler's own: coefficient arithmetic, tensor updates and
bookkeeping.

- ``ours``: the public loop (:func:`dpmsolver.solve`, NaN monitoring included);
- ``diffusers``: ``DPMSolverMultistepScheduler.step`` in a pipeline's loop;
- ``scheduler``: our :class:`~dpmsolver.frontends.diffusers_scheduler.DPMSolverScheduler`
  (built ``from_config`` of that diffusers scheduler) in the same loop.

The three are interleaved (one run of each per repeat) so that a busy machine slows them
alike; reported are medians over repeats, in microseconds per step. ``set_timesteps`` is
timed apart (a pipeline calls it once per generation): diffusers', and ours on the first
call for a step count (grid, plan, compiled coefficients) and when repeated (kept).

Run ``python -m dpmsolver.bench.overhead [--device cuda] [--out FILE]``; diffusers is a
benchmark extra (``pip install diffusers``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch

from ..sampling import solve
from ..schedules import DiscreteVPSchedule, Knot
from ..solvers import get_solver
from ..timegrid import grid_from_timesteps
from .peers import optional_import
from .records import write_text

__all__ = ["main", "measure_overhead", "overhead_table"]

SD_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure_overhead(
    shape: Sequence[int], *, steps: int = 20, device: str = "cpu", repeats: int = 20
) -> dict[str, float]:
    """Microseconds per step: ``{"ours", "diffusers", "scheduler"}`` (the last two if
    diffusers is installed), and microseconds per ``set_timesteps`` call:
    ``"diffusers_set"``, ``"scheduler_set_first"``, ``"scheduler_set"`` (repeated)."""
    dev = torch.device(device)
    x = torch.randn(*shape, device=dev)
    fixed = torch.randn(*shape, device=dev) * 0.1
    schedule = DiscreteVPSchedule()
    runs: dict[str, Callable[[], object]] = {}
    setups: dict[str, Callable[[], object]] = {}

    diffusers = optional_import("diffusers")  # benchmark extra
    timesteps: list[float]
    if diffusers is not None:
        from ..frontends.diffusers_scheduler import DPMSolverScheduler

        peer = diffusers.DPMSolverMultistepScheduler(
            **SD_CONFIG, solver_order=2, final_sigmas_type="zero", lower_order_final=True
        )
        ours = DPMSolverScheduler.from_config(peer.config, solver="dpmpp_2m")
        peer.set_timesteps(steps, device=dev)
        timesteps = [float(t) for t in peer.timesteps]

        def pipeline_loop(scheduler: object) -> Callable[[], object]:
            def loop() -> None:
                sample = x
                for t in scheduler.timesteps:  # type: ignore[attr-defined]
                    sample = scheduler.step(fixed, t, sample).prev_sample  # type: ignore[attr-defined]

            return loop

        runs["diffusers"] = pipeline_loop(peer)
        runs["scheduler"] = pipeline_loop(ours)
        setups["diffusers_set"] = lambda: peer.set_timesteps(steps, device=dev)
        setups["scheduler_set"] = lambda: ours.set_timesteps(steps, device=dev)
        # A fresh scheduler for every timing of the first call (built beforehand).
        fresh = [DPMSolverScheduler.from_config(peer.config) for _ in range(repeats)]
        setups["scheduler_set_first"] = lambda: fresh.pop().set_timesteps(steps, device=dev)
    else:
        timesteps = torch.linspace(999, 0, steps + 1)[:-1].round().tolist()

    grid = grid_from_timesteps(schedule, timesteps, final="zero")
    solver = get_solver("dpmpp_2m")

    def denoiser(xt: torch.Tensor, knot: Knot) -> torch.Tensor:
        return fixed

    runs["ours"] = lambda: solve(denoiser, x, grid, solver)

    times: dict[str, list[float]] = {k: [] for k in [*runs, *setups]}
    with torch.no_grad():  # as pipelines sample
        for name in ("diffusers_set", "scheduler_set"):
            if name in setups:
                setups[name]()
        for fn in runs.values():  # warm-up (allocator, kernels, caches)
            fn()
        for _ in range(repeats):
            for name, fn in setups.items():
                times[name].append(_timed(fn, dev))
            for name in ("diffusers_set", "scheduler_set"):
                if name in setups:
                    setups[name]()  # leave both at `steps` before their loops
            for name, fn in runs.items():
                times[name].append(_timed(fn, dev) / steps)
    out = {name: 1e6 * statistics.median(values) for name, values in times.items()}
    # Ratios of runs made back to back, then their median: a machine whose load drifts
    # during the benchmark slows both sides of a pair alike.
    if "diffusers" in times:
        for name in ("ours", "scheduler"):
            pairs = zip(times[name], times["diffusers"], strict=True)
            out[f"{name}_ratio"] = statistics.median(a / b for a, b in pairs)
    return out


SHAPES: tuple[tuple[int, ...], ...] = ((1, 4, 64, 64), (8, 4, 64, 64), (4, 4, 128, 128))


def overhead_table(
    *,
    device: str = "cpu",
    steps: int = 20,
    shapes: Sequence[Sequence[int]] = SHAPES,
    repeats: int = 20,
) -> str:
    """The markdown table of :func:`measure_overhead` over ``shapes``: medians per step,
    and the ratios (ours / diffusers, scheduler / diffusers) as medians of the ratios of
    runs made back to back."""
    lines = [
        f"Per-step solver overhead, DPM-Solver++(2M), {steps} steps, device {device} "
        f"({torch.__version__}, {torch.get_num_threads()} thread(s)); network excluded; "
        f"medians of {repeats} interleaved repeats (ratios: medians of the ratios of runs "
        f"made back to back). Regenerate: `dpmsolver bench --only "
        f"overhead` (or `python -m dpmsolver.bench.overhead --device {device}`)\n",
        "| latent shape | ours (us/step) | diffusers (us/step) | ratio "
        "| scheduler (us/step) | scheduler / diffusers |",
        "|---|---|---|---|---|---|",
    ]
    setup: dict[str, float] = {}
    for shape in shapes:
        r = measure_overhead(shape, steps=steps, device=device, repeats=repeats)
        theirs, sched = r.get("diffusers"), r.get("scheduler")
        if theirs and sched:
            cells = (
                f"{theirs:.0f} | {r['ours_ratio']:.2f} | {sched:.0f} | {r['scheduler_ratio']:.2f}"
            )
            setup = r
        else:
            cells = "n/a (diffusers not installed) | n/a | n/a | n/a"
        lines.append(f"| {tuple(shape)} | {r['ours']:.0f} | {cells} |")
    if setup:
        lines.append(
            f"\nset_timesteps({steps}), once per generation: diffusers "
            f"{setup['diffusers_set']:.0f} us; scheduler {setup['scheduler_set_first']:.0f} us "
            f"the first time for a step count (grid, plan and compiled coefficients), "
            f"{setup['scheduler_set']:.0f} us when repeated."
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or write) the overhead table."""
    p = argparse.ArgumentParser(
        prog="python -m dpmsolver.bench.overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", help="write the markdown table to this file")
    args = p.parse_args(argv)
    text = overhead_table(device=args.device, steps=args.steps, repeats=args.repeats)
    if args.out:
        write_text(args.out, text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
