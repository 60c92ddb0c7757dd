"""What a solver is, and the exponential-integrator arithmetic the DPM-Solver family shares.

A solver is a small frozen object (its parameters) with a ``step`` that takes explicit
state and returns new state; nothing hidden is kept between steps, so one step can be
tested alone and a run can be replayed. The sampling loop (:mod:`dpmsolver.sampling`)
evaluates the denoiser at the start of every step and passes ``x0_hat`` in; singlestep
solvers make their extra evaluations through the step context.

The exponential integrator (DPM-Solver++, Eq. 9-10). In data-prediction form,

    x_t = (sigma_t/sigma_s) x_s + sigma_t Int_{lambda_s}^{lambda_t} e^lambda x0(lambda) dlambda
        = (sigma_t/sigma_s) x_s - alpha_t phi_1 x0 + alpha_t phi_2 (h x0') - alpha_t phi_3 (h^2 x0'') + ...

with ``h = lambda_t - lambda_s``, ``phi_1 = expm1(-h)``, ``phi_2 = phi_1/h + 1``,
``phi_3 = phi_2/h - 1/2``. The noise-prediction form (DPM-Solver, Eq. 3.4) is the same
expression with ``(sigma, alpha, lambda, x0)`` replaced by ``(alpha, sigma, -lambda, eps)``,
so every update below is written once, for a :class:`Form`.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ..schedules import Knot, NoiseSchedule

__all__ = [
    "Form",
    "Solver",
    "StepContext",
    "combine",
    "first_order_step",
    "phi_functions",
]


class Form(enum.Enum):
    """Which prediction a solver integrates: data (DPM-Solver++) or noise (DPM-Solver)."""

    DATA = "data"
    NOISE = "noise"

    def prediction(self, x0: Tensor, x: Tensor, knot: Knot) -> Tensor:
        """The integrated quantity at ``knot``: ``x0`` itself, or ``eps = (x - alpha x0)/sigma``."""
        if self is Form.DATA:
            return x0
        return (x - x0 * knot.alpha) / knot.sigma

    def coefficients(self, s: Knot, t: Knot) -> tuple[float, float, float]:
        """``(ratio, b, h)`` of the update ``x_t = ratio x_s - b phi_1(h) m + ...``.

        Data form: ``(sigma_t/sigma_s, alpha_t, lambda_t - lambda_s)``.
        Noise form: ``(alpha_t/alpha_s, sigma_t, lambda_s - lambda_t)``.
        """
        if self is Form.DATA:
            return s_ratio(t.sigma, s.sigma), t.alpha, t.lam - s.lam
        return s_ratio(t.alpha, s.alpha), t.sigma, s.lam - t.lam


def s_ratio(num: float, den: float) -> float:
    """``num / den`` for scale factors; 0 when the numerator is 0."""
    return 0.0 if num == 0.0 else num / den


def phi_functions(h: float) -> tuple[float, float, float]:
    """``(phi_1, phi_2, phi_3)`` at ``h`` in the notation above, accurate for small ``|h|``.

    For ``|h| < 0.1`` the recursions lose digits to cancellation (``phi_3`` loses about
    ``1/h^3`` ulps), so the Taylor series is summed instead.
    """
    if math.isinf(h):
        if h > 0:
            return -1.0, 1.0, -0.5
        raise ValueError("phi functions are undefined at h = -inf")
    if abs(h) >= 0.1:
        p1 = math.expm1(-h)
        p2 = p1 / h + 1.0
        return p1, p2, p2 / h - 0.5
    # phi_1 = sum_{k>=1} (-h)^k/k!, phi_2 = -sum_{k>=1} (-h)^k/(k+1)!, phi_3 = sum (-h)^k/(k+2)!
    p1 = p2 = p3 = 0.0
    term = 1.0  # (-h)^k / k!
    for k in range(1, 14):
        term *= -h / k
        p1 += term
        p2 -= term / (k + 1)
        p3 += term / ((k + 1) * (k + 2))
    return p1, p2, p3


def combine(x: Tensor, ratio: float, terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """``ratio * x + sum(c * m)``, skipping zero coefficients (one kernel per term)."""
    out = x * ratio
    for c, m in terms:
        if c != 0.0:
            out = out.add(m, alpha=c)
    return out


def first_order_step(form: Form, x: Tensor, x0: Tensor, m: Tensor, s: Knot, t: Knot) -> Tensor:
    """DDIM / DPM-Solver-1 (DPM-Solver++, Eq. 11): ``x_t = ratio x_s - b phi_1 m``.

    Out of pure noise (``alpha_s = 0``) the noise form is singular, and into the clean end
    (``sigma_t = 0``) its phi_1 is infinite; both forms are the same exact update there, so
    the data form is used.
    """
    if form is Form.NOISE and (s.alpha == 0.0 or t.sigma == 0.0):
        form, m = Form.DATA, x0
    ratio, b, h = form.coefficients(s, t)
    return combine(x, ratio, [(-b * math.expm1(-h), m)])


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs besides the state: where it goes and how to evaluate.

    Attributes:
        index: step number (0-based).
        s: start knot; t: end knot.
        order: the order to use for this step (after warm-up and final-step rules).
        evaluate: ``evaluate(x, knot) -> x0_hat``; counts network evaluations.
        schedule: for intermediate knots (``schedule.knot_at_lambda``).
        noise: draws standard normal noise shaped like the state (stochastic solvers),
            or None for deterministic runs.
    """

    index: int
    s: Knot
    t: Knot
    order: int
    evaluate: Callable[[Tensor, Knot], Tensor]
    schedule: NoiseSchedule
    noise: Callable[[], Tensor] | None = None


class Solver(ABC):
    """Base class of every registered solver.

    Subclasses are frozen dataclasses of their parameters and implement :meth:`step`.
    ``order`` is the nominal order; ``claimed_order`` the convergence order the tests
    must measure (equal to ``order`` unless the method is known to fall short of it).
    """

    kind: ClassVar[str] = "multistep"  # "multistep", "singlestep" or "adaptive"

    order: int

    @property
    def stochastic(self) -> bool:
        """True if steps draw noise (``ctx.noise`` must then be set)."""
        return False

    @property
    def claimed_order(self) -> float:
        """Convergence order a test must measure on an exact problem."""
        return float(self.order)

    def evals_per_step(self, order: int) -> int:
        """Network evaluations of one step of this order (the loop's own one included)."""
        return 1

    def init_state(self) -> Any:
        """State before the first step."""
        return None

    def plan(
        self,
        *,
        steps: int | None,
        nfe: int | None,
        final_zero: bool,
        lower_order_final: bool,
    ) -> list[int]:
        """Order of each grid step; its length is the number of grid steps.

        Exactly one of ``steps`` and ``nfe`` is given. The default plan is multistep's:
        one evaluation per step, warm-up ``min(order, i + 1)``, and with
        ``lower_order_final`` the last steps at ``min(order, steps - i)`` (DPM-Solver,
        App. D.2). A final step to ``sigma = 0`` is always first order.
        """
        n = steps if steps is not None else nfe
        assert n is not None
        orders = [min(self.order, i + 1) for i in range(n)]
        if lower_order_final:
            orders = [min(o, n - i) for i, o in enumerate(orders)]
        if final_zero:
            orders[-1] = 1
        return orders

    @abstractmethod
    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        """Advance ``x`` from ``ctx.s`` to ``ctx.t`` given ``x0 = D(x, ctx.s)``."""
