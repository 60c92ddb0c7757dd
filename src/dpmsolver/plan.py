"""The plan of a run: which step goes where, at which order, for how many evaluations.

One owner for every rule about the order of a step, which the sampling loop
(:func:`dpmsolver.sampling.solve`) and the one-evaluation-at-a-time front ends
(:mod:`dpmsolver.frontends.stepper`) both consume:

- the solver's own rule (its shape's :meth:`~dpmsolver.solvers.Solver.plan`: warm-up for
  multistep, full order for singlestep, the order mix of "fast");
- lower-order final steps below :data:`LOWER_ORDER_FINAL_BELOW` steps (DPM-Solver,
  App. D.2; diffusers does the same), unless the caller decides;
- at the ends of the noise range only first order is defined: out of pure noise
  (``lambda = -inf``), into ``sigma = 0`` (unless the method integrates into it, like
  Adams-Bashforth in sigma~), and for a zero-length step. Those are *boundary* steps that
  drivers take themselves (:func:`boundary_update`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ._validate import check_int
from .schedules import Knot
from .solvers import AdaptiveSolver, Solver
from .timegrid import TimeGrid

__all__ = [
    "LOWER_ORDER_FINAL_BELOW",
    "Plan",
    "PlannedStep",
    "boundary_update",
    "is_boundary_step",
    "lower_order_final_default",
    "make_plan",
    "plan_steps",
    "solver_orders",
    "step_order",
]

#: Multistep runs of fewer steps than this lower their last orders (DPM-Solver App. D.2;
#: diffusers' ``lower_order_final`` applies below 15 steps as well).
LOWER_ORDER_FINAL_BELOW = 15


def lower_order_final_default(steps: int) -> bool:
    """Whether a run of ``steps`` steps (or evaluations) lowers its final orders."""
    return steps < LOWER_ORDER_FINAL_BELOW


def solver_orders(
    solver: Solver,
    *,
    steps: int | None = None,
    nfe: int | None = None,
    final_zero: bool,
    lower_order_final: bool | None = None,
) -> list[int]:
    """The solver's orders for ``steps`` grid steps or an ``nfe`` budget (exactly one),
    with :func:`lower_order_final_default` when ``lower_order_final`` is None."""
    count = steps if steps is not None else nfe
    assert count is not None
    lof = lower_order_final_default(count) if lower_order_final is None else bool(lower_order_final)
    return solver.plan(steps=steps, nfe=nfe, final_zero=final_zero, lower_order_final=lof)


def step_order(solver: Solver, s: Knot, t: Knot, order: int) -> int:
    """The order a step from ``s`` to ``t`` may use: first order out of pure noise, into the
    clean end (unless the solver integrates into it) and for a zero-length step."""
    if math.isinf(s.lam) or s.lam == t.lam:
        return 1
    if math.isinf(t.lam) and not (t.lam > 0 and solver.steps_into_zero):
        return 1
    return order


def is_boundary_step(solver: Solver, s: Knot, t: Knot) -> bool:
    """True if a driver takes the step from ``s`` to ``t`` itself (:func:`boundary_update`)."""
    return (
        (t.lam == math.inf and not solver.steps_into_zero) or t.lam == -math.inf or t.lam == s.lam
    )


def boundary_update(x: Tensor, x0: Tensor, s: Knot, t: Knot) -> Tensor:
    """A boundary step (:func:`is_boundary_step`): into sigma = 0, ``x = x0_hat``
    (DPM-Solver++ Sec. 3.1, lambda -> inf); into pure noise (inverting a flow schedule),
    ``x = eps_hat``; a zero-length step leaves ``x`` as it is."""
    if t.lam == math.inf:
        return x0
    if t.lam == -math.inf:
        return (x - x0 * s.alpha) / s.sigma
    return x


@dataclass(frozen=True)
class PlannedStep:
    """One step of a plan.

    Attributes:
        index: step number (0-based).
        s, t: start and end knots.
        order: the order of the step (after every rule above).
        evals: network evaluations it costs (the one at ``s`` included).
        boundary: the driver takes it itself (:func:`boundary_update`).
    """

    index: int
    s: Knot
    t: Knot
    order: int
    evals: int
    boundary: bool


@dataclass(frozen=True)
class Plan:
    """A solver's steps over a grid."""

    solver: Solver
    grid: TimeGrid
    steps: tuple[PlannedStep, ...]

    @property
    def orders(self) -> list[int]:
        """The order of each step."""
        return [st.order for st in self.steps]

    @property
    def nfe(self) -> int | None:
        """Network evaluations the plan spends (None for adaptive solvers, whose attempts
        are decided while they run)."""
        if isinstance(self.solver, AdaptiveSolver):
            return None
        return sum(st.evals for st in self.steps)


def make_plan(
    solver: Solver,
    grid: TimeGrid,
    orders: Sequence[int] | None = None,
    *,
    lower_order_final: bool | None = None,
) -> Plan:
    """The plan of ``solver`` over ``grid``.

    Args:
        solver: the solver.
        grid: the time grid.
        orders: order per grid step (default: :func:`solver_orders` for ``grid.steps``
            steps); each at most the solver's order, lowered by the boundary rules.
        lower_order_final: with ``orders`` None, whether to lower the final orders
            (default: :func:`lower_order_final_default`).
    """
    if orders is None:
        orders = solver_orders(
            solver,
            steps=grid.steps,
            final_zero=grid.final_zero,
            lower_order_final=lower_order_final,
        )
    return Plan(solver, grid, plan_steps(solver, grid.knots, orders))


def plan_steps(
    solver: Solver, knots: Sequence[Knot], orders: Sequence[int]
) -> tuple[PlannedStep, ...]:
    """The steps between consecutive ``knots`` at the given orders (each at most the
    solver's), with the boundary rules applied. ``knots`` need not form a
    :class:`~dpmsolver.timegrid.TimeGrid`: front ends that follow another library's
    timesteps may repeat a knot (a zero-length step)."""
    if len(orders) != len(knots) - 1:
        raise ValueError(
            f"orders has {len(orders)} entries but the grid has {len(knots) - 1} steps"
        )
    steps = []
    for i, o in enumerate(orders):
        check_int(f"orders[{i}]", o, minimum=1)
        if o > solver.order:
            raise ValueError(f"orders[{i}]={o} exceeds the solver's order {solver.order}")
        s, t = knots[i], knots[i + 1]
        order = step_order(solver, s, t, o)
        boundary = is_boundary_step(solver, s, t)
        steps.append(
            PlannedStep(i, s, t, order, 1 if boundary else solver.step_evals(i, order), boundary)
        )
    return tuple(steps)
