"""Drive a registered solver one network evaluation at a time.

Pipelines such as diffusers' own the loop: they call the network once, hand the output to
the scheduler, and expect the next state back. A multistep solver fits that exactly. A
singlestep solver evaluates the network at intermediate points inside its step, so those
points are listed among the timesteps in advance (as diffusers' singlestep and Heun
schedulers do) and the step is *replayed*: the step function runs from the step's start
with an ``evaluate`` that returns the outputs already received and, at the first one not
yet available, stops (an internal exception) and hands the point it asked for back to the
pipeline. When that output arrives, the step is run again from its start with one more
cached evaluation. Steps are pure functions of their inputs (the state is explicit, see
:mod:`dpmsolver.solvers.base`), so the replay is exact; noise draws of stochastic solvers
are cached the same way.

The rules the sampling loop (:func:`dpmsolver.sampling.solve`) applies around a solver's
step hold here too: out of pure noise and into ``sigma = 0`` only first order is defined,
and the step to ``sigma = 0`` is ``x = x0_hat``. Inversion into pure noise (a flow schedule's
``sigma = 1``) is its mirror image, ``x = eps_hat``.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..plan import boundary_update, is_boundary_step, plan_steps
from ..schedules import Knot, NoiseSchedule
from ..solvers import SinglestepSolver, Solver, StepContext

__all__ = [
    "DrivenStep",
    "OneEvaluationStepper",
    "PinnedSchedule",
    "grouped_plan",
    "probed_plan",
    "supports_fractions",
]

NoiseDraw = Callable[[Tensor, Knot, Knot], Tensor]


def _same_level(a: float, b: float) -> bool:
    """Two half log-SNRs name the same knot (up to the rounding of ``s + r (t - s)``)."""
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


class PinnedSchedule(NoiseSchedule):
    """A schedule whose ``knot_at_lambda`` returns given knots exactly at their lambdas.

    A grid may carry knots that are not the schedule's own resolution of their lambda:
    diffusers rounds the network time of Karras / log-SNR knots to an integer timestep while
    the solver keeps the unrounded noise level. When a singlestep solver asks for an
    intermediate point that is such a knot, it must get that knot, network time included.
    Everything else is delegated to ``base``.
    """

    def __init__(self, base: NoiseSchedule, pins: Sequence[Knot]) -> None:
        self.base = base
        self.t_min, self.t_max = base.t_min, base.t_max
        finite = sorted((k for k in pins if math.isfinite(k.lam)), key=lambda k: k.lam)
        self._pins = finite
        self._lams = [k.lam for k in finite]

    def log_alpha(self, t: Tensor) -> Tensor:
        return self.base.log_alpha(t)

    def log_sigma(self, t: Tensor) -> Tensor:
        return self.base.log_sigma(t)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return self.base.t_of_lambda(lam)

    def lambda_(self, t: Tensor) -> Tensor:
        return self.base.lambda_(t)

    def model_time(self, t: Tensor) -> Tensor:
        return self.base.model_time(t)

    def t_of_model_time(self, model_t: Tensor) -> Tensor:
        return self.base.t_of_model_time(model_t)

    def knot(self, t: float) -> Knot:
        return self.base.knot(t)

    def zero_knot(self) -> Knot:
        return self.base.zero_knot()

    def knot_at_lambda(self, lam: float) -> Knot:
        i = bisect.bisect_left(self._lams, lam)
        for j in (i - 1, i):
            if 0 <= j < len(self._pins) and _same_level(self._lams[j], lam):
                return self._pins[j]
        return self.base.knot_at_lambda(lam)


@dataclass(frozen=True)
class DrivenStep:
    """One solver step as a one-evaluation-at-a-time protocol sees it.

    Attributes:
        s, t: start and end knots.
        order: the order of this step (after warm-up, final-step and pure-noise rules).
        solver: the solver object that takes the step.
        evals: knots where the network is evaluated during the step, ``s`` first.
    """

    s: Knot
    t: Knot
    order: int
    solver: Solver
    evals: tuple[Knot, ...]


def supports_fractions(solver: Solver) -> bool:
    """True for singlestep solvers whose intermediate points are the options ``r1``/``r2``
    (fractions of the step in lambda), which a grid can therefore dictate."""
    if not isinstance(solver, SinglestepSolver) or not dataclasses.is_dataclass(solver):
        return False
    names = {f.name for f in dataclasses.fields(solver)}
    return {"r1", "r2"} <= names


def grouped_plan(solver: Solver, knots: Sequence[Knot], groups: Sequence[int]) -> list[DrivenStep]:
    """Singlestep steps whose intermediate points are grid knots (diffusers'
    ``DPMSolverSinglestepScheduler`` layout): a step of order ``k`` spans ``k`` consecutive
    intervals of ``knots`` and evaluates at each knot it covers, with the fractions
    ``r_j = (lambda_{i+j} - lambda_i) / (lambda_{i+k} - lambda_i)`` taken from the grid.

    ``groups`` lists the order of each step; it must cover every interval.
    """
    if sum(groups) != len(knots) - 1:
        raise ValueError(f"groups {list(groups)} do not cover the {len(knots) - 1} grid intervals")
    if any(g > 1 for g in groups) and not supports_fractions(solver):
        raise ValueError(
            f"{type(solver).__name__} does not take its intermediate points from options r1/r2, "
            "so the grid cannot place them; use the solver's own layout"
        )
    steps: list[DrivenStep] = []
    i = 0
    for g in groups:
        s, t = knots[i], knots[i + g]
        if g > 1 and (math.isinf(s.lam) or math.isinf(t.lam)):
            raise ValueError(
                "a singlestep step of order > 1 cannot start at pure noise or end at sigma = 0"
            )
        step_solver = solver
        if g > 1:
            h = t.lam - s.lam
            fractions = [(knots[i + j].lam - s.lam) / h for j in range(1, g)]
            r2 = fractions[1] if g == 3 else None
            step_solver = dataclasses.replace(solver, order=g, r1=fractions[0], r2=r2)  # type: ignore[type-var]
        steps.append(DrivenStep(s, t, g, step_solver, tuple(knots[i : i + g])))
        i += g
    return steps


def _probe(
    solver: Solver, s: Knot, t: Knot, order: int, schedule: NoiseSchedule, index: int = 0
) -> tuple[Knot, ...]:
    """Where a step evaluates the network: run it once on a dummy state and record every
    knot it asks for. The points of every solver here depend on ``s``, ``t`` and its
    options only, never on the state, so the dummy run finds the real ones."""
    seen = [s]
    dummy = torch.zeros(1, 1, dtype=torch.float64)

    def evaluate(x: Tensor, knot: Knot) -> Tensor:
        seen.append(knot)
        return torch.zeros_like(x)

    ctx = StepContext(index, s, t, order, evaluate, schedule, lambda a, b: torch.zeros_like(dummy))
    solver.step(ctx, dummy, dummy, solver.init_state())
    return tuple(seen)


def probed_plan(
    solver: Solver, knots: Sequence[Knot], orders: Sequence[int], schedule: NoiseSchedule
) -> list[DrivenStep]:
    """One step per interval of ``knots`` with the given orders; each step's evaluation
    points are the ones the solver itself chooses (found by a dry run)."""
    steps = []
    for st in plan_steps(solver, knots, orders):
        if st.evals == 1:
            evals: tuple[Knot, ...] = (st.s,)
        else:
            evals = _probe(solver, st.s, st.t, st.order, schedule, st.index)
        steps.append(DrivenStep(st.s, st.t, st.order, solver, evals))
    return steps


class _NeedEvaluation(Exception):  # control flow, not an error
    """Raised inside a replayed step at the first evaluation not yet received."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.x = x


class OneEvaluationStepper:
    """Runs planned steps, consuming one data prediction per call.

    Positions count evaluations: position ``p`` is the ``p``-th evaluation of the plan
    (counting from ``offset``, the position of the plan's first evaluation in the caller's
    timesteps). :meth:`advance` takes the data prediction at the current position and
    returns the state at the next one (an intermediate point, or the step's end).

    Args:
        steps: the plan.
        schedule: the schedule the solvers see (a :class:`PinnedSchedule` for grids with
            pinned knots).
        offset: position of the first evaluation (default 0).
    """

    def __init__(
        self, steps: Sequence[DrivenStep], schedule: NoiseSchedule, offset: int = 0
    ) -> None:
        if not steps:
            raise ValueError("the plan has no steps")
        self.steps = list(steps)
        self.schedule = schedule
        self.offset = offset
        self._where = [(p, j) for p, st in enumerate(self.steps) for j in range(len(st.evals))]
        self._next = offset
        self._state: Any = self.steps[0].solver.init_state()
        self._x: Tensor | None = None
        self._x0: Tensor | None = None
        self._cache: list[Tensor] = []
        self._noise: list[Tensor] = []

    @property
    def evaluations(self) -> list[Knot]:
        """Every evaluation knot in order."""
        return [k for st in self.steps for k in st.evals]

    @property
    def next_position(self) -> int:
        """The position whose data prediction :meth:`advance` expects next."""
        return self._next

    @property
    def done(self) -> bool:
        """True once the last step has finished."""
        return self._next == self.offset + len(self._where)

    def locate(self, position: int) -> tuple[DrivenStep, int]:
        """The step holding evaluation ``position`` and its index among the step's evaluations."""
        p, j = self._where[position - self.offset]
        return self.steps[p], j

    def advance(self, x0: Tensor, x: Tensor, draw_noise: NoiseDraw | None = None) -> Tensor:
        """Take ``x0 = D(x)`` at the current position; return the state at the next one.

        Args:
            x0: data prediction at the current evaluation knot.
            x: the state the network was evaluated at.
            draw_noise: ``draw_noise(x) -> standard normal like x`` for stochastic solvers.
        """
        if self.done:
            raise RuntimeError("all planned steps are done; set the timesteps again to sample anew")
        p, j = self._where[self._next - self.offset]
        step = self.steps[p]
        if j == 0:
            self._x, self._x0, self._cache, self._noise = x, x0, [], []
        else:
            self._cache.append(x0)
        out = self._run(p, step, draw_noise)
        self._next += 1
        return out

    def _run(self, index: int, step: DrivenStep, draw_noise: NoiseDraw | None) -> Tensor:
        assert self._x is not None and self._x0 is not None
        x, x0, s, t = self._x, self._x0, step.s, step.t
        if is_boundary_step(step.solver, s, t):  # sigma = 0, pure noise, or a repeated knot
            return boundary_update(x, x0, s, t)
        if step.solver.stochastic and draw_noise is None:
            raise ValueError(
                f"{type(step.solver).__name__} is stochastic: a noise source is required"
            )
        cache, noises = self._cache, self._noise
        used = [0, 0]  # evaluations and noise draws consumed by this replay

        def evaluate(x_eval: Tensor, knot: Knot) -> Tensor:
            k = used[0]
            if k < len(cache):
                used[0] += 1
                return cache[k]
            expected = step.evals[k + 1] if k + 1 < len(step.evals) else None
            if expected is None or not _same_level(knot.lam, expected.lam):
                where = "none" if expected is None else f"lambda={expected.lam:.9g}"
                raise RuntimeError(
                    f"step {index} asked for an evaluation at lambda={knot.lam:.9g} but the "
                    f"timesteps planned {where}; the solver's evaluation points changed"
                )
            raise _NeedEvaluation(x_eval)

        def noise(a: Knot, b: Knot) -> Tensor:
            n = used[1]
            if n == len(noises):
                assert draw_noise is not None
                noises.append(draw_noise(x, a, b))
            used[1] += 1
            return noises[n]

        ctx = StepContext(
            index, s, t, step.order, evaluate, self.schedule, noise if draw_noise else None
        )
        try:
            x_next, new_state = step.solver.step(ctx, x, x0, self._state)
        except _NeedEvaluation as pending:
            return pending.x
        self._state = new_state
        return x_next
