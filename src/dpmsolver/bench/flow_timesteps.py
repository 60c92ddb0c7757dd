"""Why diffusers' UniPC on flow sigmas beats ours on some flow cells: its integer timesteps.

On the held-out rectified-flow problem iso8-flow at 20-25 NFE, diffusers'
``UniPCMultistepScheduler`` (``use_flow_sigmas``, third order) stays ahead of our tuned
profile on the typical sample, not only on a few rare ones (:mod:`.miss_tails`: trimmed
ratios 1.36-2.14). Both evaluate the network at nearly the same noise levels. The
scheduler steps with float noise levels ``s``, but its ``timesteps`` are ``int64``
(``floor(1000 s)``), and a pipeline hands the network that integer, as every peer
configuration of the suite does (:func:`.peer_suite.flow_config`, ``model_time=
"timestep"``): the network then sees a noise level up to 1/1000 below the one the
scheduler steps with. That is a per-step shift of the model's time, which changes the
error (the model-time shifts of :mod:`dpmsolver.tune` stage (c), LD3 and DC-Solver learn
such shifts on purpose).

For each cell this measures, on the same new noises (:func:`.rescore.rescore_seed`) and
against the exact ODE solution: the scheduler as the suite runs it (network at the integer
timestep), the same scheduler with the network at its own ``s`` (``model_time="sigma"``: the
ODE it integrates), and our ``unipc`` (order 3, lower orders at the end, as diffusers
does) on the scheduler's own noise levels. Nothing is chosen from it.

``python -m dpmsolver.bench.flow_timesteps [--problems iso8-flow,diag64-flow3] [--out
benchmarks/flow_timesteps.md]`` (a few minutes).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..recipe import Recipe
from ..sampling import sample
from .calibrated_peer import _Draw, _geo
from .peer_suite import ModelTime, PeerTask, flow_config, run_peer
from .peers import diffusers_class
from .records import command_line, publish
from .rescore import conditioning, network, rescore_seed
from .suite import GUIDANCE, MixtureProblem, _rms, get_problem

__all__ = ["NFES", "PROBLEMS", "FlowCell", "main", "markdown", "measure"]

#: The held-out rectified-flow problems (the misses :mod:`.miss_tails` found).
PROBLEMS = ("iso8-flow", "diag64-flow3")
#: Budgets measured.
NFES = (10, 15, 20, 25)
SCHEDULER = "UniPCMultistepScheduler"
#: Ours: the scheduler's method (UniPC bh2, order 3, lower orders at the end).
OURS = Recipe("unipc", {"order": 3}, lower_order_final=True)


@dataclass(frozen=True)
class FlowCell:
    """One cell's RMS errors: ``timestep`` (diffusers, network at the integer timestep),
    ``sigma`` (diffusers, network at its own noise level) and ``ours`` (our solver on the
    scheduler's noise levels)."""

    problem: str
    guidance: float
    nfe: int
    timestep: float
    sigma: float
    ours: float


def _scheduler_sigmas(problem: MixtureProblem, nfe: int) -> list[float]:
    cls = diffusers_class(SCHEDULER)
    shift = float(getattr(problem.schedule, "shift", 1.0))
    sched = cls(
        use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", solver_order=3
    )
    sched.set_timesteps(nfe)
    return [float(s) for s in sched.sigmas]


def measure(
    problem: MixtureProblem, guidance: float, nfes: Sequence[int], n: int
) -> list[FlowCell]:
    """The cells of one problem and guidance scale on ``n`` new noises."""
    z = problem.noise(n, seed=rescore_seed(problem))
    draw = _Draw(problem, guidance, z)
    task = PeerTask(problem, draw.den, draw.x_T)
    net = network(problem, "x0")
    times: tuple[ModelTime, ...] = ("timestep", "sigma")
    configs = {
        mt: flow_config(SCHEDULER, mt, flow_sigmas=True, model_time=mt, solver_order=3)
        for mt in times
    }
    out = []
    for nfe in nfes:
        errors = {}
        for mt, config in configs.items():
            if config is None:
                raise RuntimeError("diffusers is not installed (pip install -e '.[test]')")
            x = run_peer(config, task, nfe).sample
            errors[mt] = math.inf if x is None else _rms(x, draw.reference)
        res = sample(
            net,
            z,
            schedule=problem.schedule,
            prediction="x0",
            solver=OURS,
            sigmas=_scheduler_sigmas(problem, nfe),
            guidance_scale=guidance,
            **conditioning(problem, n),
        )
        if res.nfe != nfe:
            raise RuntimeError(f"ours made {res.nfe} evaluations, not {nfe}")
        ours = _rms(res.x, draw.reference)
        out.append(FlowCell(problem.name, guidance, nfe, errors["timestep"], errors["sigma"], ours))
    return out


def markdown(cells: Sequence[FlowCell], command: str, minutes: float) -> str:
    """The record: a summary and every cell."""
    gain = [c.timestep / c.sigma for c in cells]
    same = [c.ours / c.sigma for c in cells]
    out = [
        "# Diffusers' UniPC on flow sigmas: the network at the integer timestep or at its own s",
        "",
        (__doc__ or "").split("``python -m")[0].strip(),
        "",
        f"Command: `{command}`; took {minutes:.1f} min on a shared machine of 2 CPUs.",
        "",
        "| cells | integer timestep better | geo-mean timestep / sigma | range | "
        "ours / sigma (same ODE) range |",
        "|---|---|---|---|---|",
        f"| {len(cells)} | {sum(g < 1 for g in gain)} | {_geo(gain):.3f} | "
        f"{min(gain):.3g}-{max(gain):.3g} | {min(same):.4f}-{max(same):.4f} |",
        "",
        "| problem | w | NFE | timestep | sigma | ours | timestep / sigma | ours / sigma |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, g, s in zip(cells, gain, same, strict=True):
        out.append(
            f"| {c.problem} | {c.guidance:g} | {c.nfe} | {c.timestep:.3e} | {c.sigma:.3e} | "
            f"{c.ours:.3e} | {g:.3f} | {s:.4f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpmsolver.bench.flow_timesteps``."""
    ap = argparse.ArgumentParser(prog="python -m dpmsolver.bench.flow_timesteps")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="flow problems, comma-separated")
    ap.add_argument("--noises", type=int, default=512, help="new noises per cell (default 512)")
    ap.add_argument("--out", default=None, help="the markdown record")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cells: list[FlowCell] = []
    for name in args.problems.split(","):
        problem = get_problem(name)
        if not isinstance(problem, MixtureProblem) or problem.family != "flow":
            ap.error(f"--problems: {name!r} is not an exact rectified-flow mixture problem")
        for w in GUIDANCE:
            cells += measure(problem, w, NFES, args.noises)
            print(f"{name} w={w:g} done", file=sys.stderr, flush=True)
    command = command_line("dpmsolver.bench.flow_timesteps", argv)
    text = markdown(cells, command, (time.perf_counter() - t0) / 60)
    publish(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
