"""Per-step solver overhead, excluding the network, against diffusers.

Both sides run DPM-Solver++(2M) (midpoint, data prediction, logSNR-free default spacing,
final step to sigma = 0) for ``steps`` steps on the same latent tensor with a "network"
that costs nothing (it returns a fixed tensor), so the time measured is the solver's own:
coefficient arithmetic, tensor updates and bookkeeping. Ours is timed through the public
loop (:func:`dpmsolver.solve`, NaN monitoring included); diffusers' through
``DPMSolverMultistepScheduler.step``. Reported: microseconds per step (median of repeats).

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

__all__ = ["main", "measure_overhead", "overhead_table"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels, caches)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_overhead(
    shape: Sequence[int], *, steps: int = 20, device: str = "cpu", repeats: int = 20
) -> dict[str, float]:
    """Microseconds per step: ``{"ours": ..., "diffusers": ...}`` (diffusers if installed)."""
    dev = torch.device(device)
    x = torch.randn(*shape, device=dev)
    fixed = torch.randn(*shape, device=dev) * 0.1
    schedule = DiscreteVPSchedule()
    out: dict[str, float] = {}

    diffusers = optional_import("diffusers")  # benchmark extra
    timesteps: list[float]
    if diffusers is not None:
        sched = diffusers.DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            solver_order=2,
            final_sigmas_type="zero",
            lower_order_final=True,
        )
        sched.set_timesteps(steps, device=dev)
        timesteps = [float(t) for t in sched.timesteps]

        def run_diffusers() -> None:
            sched.set_timesteps(steps, device=dev)
            sample = x
            for t in sched.timesteps:
                sample = sched.step(fixed, t, sample).prev_sample

        out["diffusers"] = 1e6 * _time(run_diffusers, dev, repeats) / steps
    else:
        timesteps = torch.linspace(999, 0, steps + 1)[:-1].round().tolist()

    grid = grid_from_timesteps(schedule, timesteps, final="zero")
    solver = get_solver("dpmpp_2m")

    def denoiser(xt: torch.Tensor, knot: Knot) -> torch.Tensor:
        return fixed

    def run_ours() -> None:
        solve(denoiser, x, grid, solver)

    out["ours"] = 1e6 * _time(run_ours, dev, repeats) / steps
    return out


SHAPES: tuple[tuple[int, ...], ...] = ((1, 4, 64, 64), (8, 4, 64, 64), (4, 4, 128, 128))


def overhead_table(
    *,
    device: str = "cpu",
    steps: int = 20,
    shapes: Sequence[Sequence[int]] = SHAPES,
    repeats: int = 20,
) -> str:
    """The markdown table of :func:`measure_overhead` over ``shapes`` (ratio = ours / diffusers)."""
    lines = [
        f"Per-step solver overhead, DPM-Solver++(2M), {steps} steps, device {device} "
        f"({torch.__version__}); network excluded. Regenerate: `dpmsolver bench --only overhead` "
        f"(or `python -m dpmsolver.bench.overhead --device {device}`)\n",
        "| latent shape | ours (us/step) | diffusers (us/step) | ratio |",
        "|---|---|---|---|",
    ]
    for shape in shapes:
        r = measure_overhead(shape, steps=steps, device=device, repeats=repeats)
        theirs = r.get("diffusers")
        cells = (
            f"{theirs:.0f} | {r['ours'] / theirs:.2f}"
            if theirs
            else "n/a (diffusers not installed) | n/a"
        )
        lines.append(f"| {tuple(shape)} | {r['ours']:.0f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print (or write) the overhead table."""
    p = argparse.ArgumentParser(
        prog="python -m dpmsolver.bench.overhead", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", help="write the markdown table to this file")
    args = p.parse_args(argv)
    text = overhead_table(device=args.device, steps=args.steps)
    if args.out:
        from ..io import atomic_write_text

        atomic_write_text(args.out, text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
