"""The three shapes a solver comes in, as base classes that own their skeleton.

- :class:`MultistepSolver`: one network evaluation per step; earlier predictions replace
  the derivatives of the expansion (DPM-Solver++ Alg. 2, UniPC, DEIS, iPNDM, PNDM). The base
  owns the state (the last predictions and their knots), the warm-up (a step uses as many
  past predictions as there are), the first-order fallback out of pure noise and the
  bookkeeping; a subclass gives only its higher-order update.
- :class:`SinglestepSolver`: a step of order ``k`` evaluates the network ``k`` times, at
  intermediate points inside the step (DPM-Solver Alg. 1-2, EDM's Heun). The base owns the
  cost and the plan.
- :class:`AdaptiveSolver`: a singlestep solver with an embedded lower-order solution whose
  difference drives step-size control (DPM-Solver Sec. 4.2); the sampling loop integrates
  each grid interval with :class:`dpmsolver.sampling.StepSizeController`.

Drivers (the sampling loop, the one-evaluation-at-a-time front ends) ask these types, not
strings, what a solver can do.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..schedules import Knot
from .base import Form, Solver, StepContext, first_order_step

__all__ = [
    "AdaptiveSolver",
    "MultistepSolver",
    "MultistepState",
    "SinglestepSolver",
    "history_order",
    "singlestep_plan",
]


# ----------------------------------------------------------------------------------------
# Multistep
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultistepState:
    """What a multistep run remembers between steps.

    Attributes:
        knots: starts of the last steps (newest first).
        preds: the solver's prediction at each of them.
        x_prev: the state the last step started from (for correctors), or None.
        prev_order: the order of the last step (a corrector's order), 0 before any.
    """

    knots: tuple[Knot, ...] = ()
    preds: tuple[Tensor, ...] = ()
    x_prev: Tensor | None = None
    prev_order: int = 0

    @property
    def lams(self) -> tuple[float, ...]:
        """Half log-SNRs of :attr:`knots`."""
        return tuple(k.lam for k in self.knots)

    def push(
        self, knot: Knot, pred: Tensor, keep: int, *, x_prev: Tensor | None = None, order: int = 0
    ) -> MultistepState:
        """The state after a step that started at ``knot`` with prediction ``pred``,
        holding at most ``keep`` predictions."""
        return MultistepState(
            knots=(knot, *self.knots)[:keep],
            preds=(pred, *self.preds)[:keep],
            x_prev=x_prev,
            prev_order=order,
        )


def history_order(order: int, s: Knot, lams: Sequence[float]) -> int:
    """The order a multistep step from ``s`` can use with stored predictions at ``lams``:
    ``order`` capped by the history (warm-up). Predictions at pure noise (lambda = -inf)
    carry no derivative information, and a step out of pure noise is first order."""
    if not math.isfinite(s.lam):
        return 1
    usable = sum(1 for lam in lams if math.isfinite(lam))
    return min(order, usable + 1)


class MultistepSolver(Solver):
    """One evaluation per step; the last ``order - 1`` predictions stand in for derivatives.

    The skeleton of :meth:`step` (DPM-Solver++ Alg. 2 and every method of its kind):

    1. ``m0``: the prediction the method integrates (:meth:`history_form`) at the start;
    2. :meth:`correct` the incoming state with it (UniPC's corrector; default: nothing);
    3. the order: the planned one, capped by the stored predictions (warm-up) and first
       order out of pure noise (:func:`history_order`);
    4. first order: DDIM (:func:`~.base.first_order_step`); otherwise :meth:`update`;
    5. remember ``m0`` (:meth:`remember`).

    Subclasses give :meth:`update` (their coefficients) and, if they differ,
    :meth:`history_form`, :attr:`history_size` and the hooks. Momentum methods, whose state
    is a velocity rather than predictions, override :meth:`step` itself.
    """

    def history_form(self) -> Form:
        """The prediction the method integrates and remembers (default: data)."""
        return Form.DATA

    @property
    def history_size(self) -> int:
        """How many predictions the state keeps (``order - 1``)."""
        return self.order - 1

    def init_state(self) -> MultistepState:
        return MultistepState()

    def plan(
        self, *, steps: int | None, nfe: int | None, final_zero: bool, lower_order_final: bool
    ) -> list[int]:
        """One evaluation per step, so ``steps`` and ``nfe`` count the same thing. Warm-up
        ``min(order, i + 1)``; with ``lower_order_final`` the last steps at
        ``min(order, steps - i)`` (DPM-Solver, App. D.2). A final step to ``sigma = 0`` is
        first order unless the method integrates into it."""
        n = steps if steps is not None else nfe
        assert n is not None
        orders = [min(self.order, i + 1) for i in range(n)]
        if lower_order_final:
            orders = [min(o, n - i) for i, o in enumerate(orders)]
        if final_zero and not self.steps_into_zero:
            orders[-1] = 1
        return orders

    def step(
        self, ctx: StepContext, x: Tensor, x0: Tensor, state: MultistepState
    ) -> tuple[Tensor, MultistepState]:
        form = self.history_form()
        m0 = form.prediction(x0, x, ctx.s)
        x = self.correct(ctx, x, m0, state)
        k = history_order(ctx.order, ctx.s, state.lams)
        x_t = self.advance(ctx, k, x, x0, m0, state)
        return x_t, self.remember(state, ctx.s, m0, x, k)

    def correct(self, ctx: StepContext, x: Tensor, m0: Tensor, state: MultistepState) -> Tensor:
        """The incoming state, corrected with ``m0`` (default: unchanged)."""
        return x

    def advance(
        self, ctx: StepContext, k: int, x: Tensor, x0: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        """The step of order ``k``: DDIM for ``k = 1``, else :meth:`update`."""
        if k == 1:
            return first_order_step(self.history_form(), x, x0, m0, ctx.s, ctx.t)
        return self.update(ctx, k, x, m0, state)

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        """The order-``k`` update (``k >= 2``) from ``x`` at ``ctx.s`` to ``ctx.t`` with
        ``m0`` and the stored predictions."""
        raise NotImplementedError(f"{type(self).__name__} must implement update()")

    def remember(
        self, state: MultistepState, s: Knot, m0: Tensor, x: Tensor, k: int
    ) -> MultistepState:
        """The state after the step (default: push ``m0``)."""
        return state.push(s, m0, self.history_size)


# ----------------------------------------------------------------------------------------
# Singlestep
# ----------------------------------------------------------------------------------------


def singlestep_plan(k: int, *, steps: int | None, nfe: int | None, final_zero: bool) -> list[int]:
    """Every step at order ``k`` (``k`` evaluations each); a final step to ``sigma = 0`` is
    the loop's one-evaluation data-prediction step. Given ``nfe``, the budget must fit."""
    if steps is None:
        assert nfe is not None
        body = nfe - 1 if final_zero else nfe
        if body % k != 0:
            raise ValueError(
                f"nfe={nfe} cannot be spent by whole order-{k} singlestep steps"
                f"{' plus the final step to sigma=0' if final_zero else ''}; pass steps=, "
                "or use a 'fast' solver, which mixes orders to spend any budget"
            )
        steps = body // k + (1 if final_zero else 0)
        if steps < 1:
            raise ValueError(f"nfe={nfe} is too small")
    orders = [k] * steps
    if final_zero:
        orders[-1] = 1
    return orders


class SinglestepSolver(Solver):
    """A step of order ``k`` costs ``k`` evaluations: the loop's one at its start and
    ``k - 1`` at intermediate points the step asks for through ``ctx.evaluate``. Every step
    runs at the full order (:func:`singlestep_plan`)."""

    def evals_per_step(self, order: int) -> int:
        return order

    def plan(
        self, *, steps: int | None, nfe: int | None, final_zero: bool, lower_order_final: bool
    ) -> list[int]:
        return singlestep_plan(self.order, steps=steps, nfe=nfe, final_zero=final_zero)


# ----------------------------------------------------------------------------------------
# Adaptive
# ----------------------------------------------------------------------------------------


class AdaptiveSolver(SinglestepSolver):
    """A singlestep solver with error control (DPM-Solver, Sec. 4.2 and Alg. 4): an
    attempt returns the step's solution and an embedded lower-order one; their scaled
    difference accepts or rejects it and sets the next step. It chooses its own steps, so
    its plan is one interval (two with the final step to ``sigma = 0``)."""

    h_init: float

    @abstractmethod
    def attempt(self, ctx: StepContext, x: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """One attempt from ``ctx.s`` to ``ctx.t``: ``(x_high, x_low)``."""

    @abstractmethod
    def error(self, x_high: Tensor, x_low: Tensor, x_prev: Tensor) -> float:
        """The scaled error norm; an attempt is accepted when it is at most 1."""

    @abstractmethod
    def next_h(self, h: float, err: float, remaining: float) -> float:
        """The next trial step in lambda."""

    def plan(
        self, *, steps: int | None, nfe: int | None, final_zero: bool, lower_order_final: bool
    ) -> list[int]:
        n = steps if steps is not None else nfe
        assert n is not None
        return [self.order] * n

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        x_high, _ = self.attempt(ctx, x, x0)
        return x_high, state
