"""Singlestep DPM-Solver++ / DPM-Solver (orders 1-3) and the "fast" order mix.

Lu et al. 2022, "DPM-Solver", Alg. 1 (DPM-Solver-2), Alg. 2 (DPM-Solver-3) and Sec. 3.4
(DPM-Solver-fast); "DPM-Solver++", Alg. 1 (2S) for the data form. With ``h`` the step in
the form's log-SNR variable, ``m`` the form's prediction and ``b``, ``ratio`` as in
:class:`~dpmsolver.solvers.base.Form`:

order 2 (intermediate at ``r1 h``, default r1 = 1/2):
    u  = (s_s1/s_s) x - b_s1 phi_1(r1 h) m0
    midpoint: x_t = (s_t/s_s) x - b phi_1 m0 - 1/(2 r1) b phi_1 (m(u) - m0)
    heun:     x_t = (s_t/s_s) x - b phi_1 m0 + 1/r1 b phi_2 (m(u) - m0)
order 3 (intermediates at ``r1 h, r2 h``, defaults 1/3, 2/3):
    u1 = (s_s1/s_s) x - b_s1 phi_1(r1 h) m0
    u2 = (s_s2/s_s) x - b_s2 phi_1(r2 h) m0 + r2/r1 b_s2 phi_2(r2 h) (m(u1) - m0)
    midpoint: x_t = (s_t/s_s) x - b phi_1 m0 + 1/r2 b phi_2 (m(u2) - m0)
    heun:     D1_0 = (m(u1) - m0)/r1, D1_1 = (m(u2) - m0)/r2,
              x_t = ... - b phi_1 m0 + b phi_2 (r2 D1_0 - r1 D1_1)/(r2 - r1)
                                     - b phi_3 2 (D1_1 - D1_0)/(r2 - r1)
("midpoint" is the official code's ``solver_type="dpmsolver"``, "heun" its ``"taylor"``.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from .._validate import check_choice, check_int
from .base import Form, StepContext, combine, first_order_step, phi_functions
from .registry import FORM_FAMILIES, SolverInfo, register
from .shapes import SinglestepSolver

__all__ = ["FastDPMSolver", "SinglestepDPMSolver", "fast_orders", "singlestep_update"]

Variant = Literal["midpoint", "heun"]


def singlestep_update(
    ctx: StepContext,
    form: Form,
    x: Tensor,
    x0: Tensor,
    order: int,
    *,
    r1: float,
    r2: float,
    variant: Variant,
) -> tuple[Tensor, Tensor | None]:
    """One singlestep update of ``order``; returns ``(x_t, lower)``.

    ``lower`` is the embedded lower-order solution at ``t`` that the adaptive solver
    compares against (DPM-Solver, Sec. 4.2): for order 2 the first-order step, for order 3
    the second-order step that uses the first intermediate evaluation. It costs no extra
    evaluation. For order 1 it is None.
    """
    s, t = ctx.s, ctx.t
    m0 = form.prediction(x0, x, s)
    x_first = first_order_step(form, x, x0, m0, s, t)
    if order == 1:
        return x_first, None
    ratio, b, h = form.coefficients(s, t)
    phi_1, phi_2, phi_3 = phi_functions(h)
    lam_step = t.lam - s.lam
    s1 = ctx.schedule.knot_at_lambda(s.lam + r1 * lam_step)
    ratio1, b1, h1 = form.coefficients(s, s1)
    p1_1, _p2_1, _ = phi_functions(h1)
    u1 = combine(x, ratio1, [(-b1 * p1_1, m0)])
    m1 = form.prediction(ctx.evaluate(u1, s1), u1, s1)
    if order == 2:
        if variant == "midpoint":
            c = -0.5 / r1 * b * phi_1
        else:
            c = b * phi_2 / r1
        return combine(x, ratio, [(-b * phi_1 - c, m0), (c, m1)]), x_first
    # Embedded second-order solution through u1 (used by the adaptive DPM-Solver-23).
    c_low = -0.5 / r1 * b * phi_1
    lower = combine(x, ratio, [(-b * phi_1 - c_low, m0), (c_low, m1)])
    s2 = ctx.schedule.knot_at_lambda(s.lam + r2 * lam_step)
    ratio2, b2, h2 = form.coefficients(s, s2)
    p1_2, p2_2, _ = phi_functions(h2)
    c_u2 = r2 / r1 * b2 * p2_2
    u2 = combine(x, ratio2, [(-b2 * p1_2 - c_u2, m0), (c_u2, m1)])
    m2 = form.prediction(ctx.evaluate(u2, s2), u2, s2)
    if variant == "midpoint":
        c2 = b * phi_2 / r2
        return combine(x, ratio, [(-b * phi_1 - c2, m0), (c2, m2)]), lower
    # Taylor form: D1 = (r2 D1_0 - r1 D1_1)/(r2 - r1), D2 = 2 (D1_1 - D1_0)/(r2 - r1)
    a_d10 = b * phi_2 * r2 / (r2 - r1) + b * phi_3 * 2.0 / (r2 - r1)
    a_d11 = -b * phi_2 * r1 / (r2 - r1) - b * phi_3 * 2.0 / (r2 - r1)
    c1, c2 = a_d10 / r1, a_d11 / r2
    return combine(x, ratio, [(-b * phi_1 - c1 - c2, m0), (c1, m1), (c2, m2)]), lower


@dataclass(frozen=True)
class SinglestepDPMSolver(SinglestepSolver):
    """Singlestep DPM-Solver++ (``Form.DATA``) / DPM-Solver (``Form.NOISE``) of fixed order.

    A step of order k costs k evaluations. With ``nfe=`` the budget must fit whole steps;
    :class:`FastDPMSolver` mixes orders to spend any budget exactly.

    Args:
        order: 1, 2 or 3.
        form: data or noise prediction.
        variant: ``"midpoint"`` (default) or ``"heun"`` final combination (see module doc).
        r1, r2: intermediate points as fractions of the step in lambda (defaults 1/2 for
            order 2; 1/3 and 2/3 for order 3).
    """

    order: int = 2
    form: Form = Form.DATA
    variant: Variant = "midpoint"
    r1: float | None = None
    r2: float | None = None

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("variant", self.variant, ("midpoint", "heun"))
        r1, r2 = self.fractions(self.order)
        if not (0.0 < r1 < 1.0) or not (r1 < r2 <= 1.0):
            raise ValueError(f"need 0 < r1 < r2 <= 1, got r1={r1}, r2={r2}")

    def fractions(self, order: int) -> tuple[float, float]:
        """Intermediate points ``(r1, r2)`` used by a step of ``order``."""
        if order == 2:
            return (0.5 if self.r1 is None else self.r1), 1.0
        return (1.0 / 3.0 if self.r1 is None else self.r1), (
            2.0 / 3.0 if self.r2 is None else self.r2
        )

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        r1, r2 = self.fractions(ctx.order)
        x_t, _ = singlestep_update(
            ctx, self.form, x, x0, ctx.order, r1=r1, r2=r2, variant=self.variant
        )
        return x_t, state


def fast_orders(nfe: int, order: int) -> list[int]:
    """DPM-Solver-fast's order sequence spending exactly ``nfe`` evaluations
    (DPM-Solver, Sec. 3.4 and App. D.2): as many order-``order`` steps as fit, then lower."""
    if order == 3:
        k = nfe // 3 + 1
        if nfe % 3 == 0:
            return [3] * (k - 2) + [2, 1]
        if nfe % 3 == 1:
            return [3] * (k - 1) + [1]
        return [3] * (k - 1) + [2]
    if order == 2:
        return [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    return [1] * nfe


@dataclass(frozen=True)
class FastDPMSolver(SinglestepDPMSolver):
    """DPM-Solver-fast: singlestep steps of mixed order that spend exactly the requested
    number of evaluations ``nfe`` (DPM-Solver, Sec. 3.4). Given ``steps`` instead, every
    step has the full order (the fixed-order singlestep solver).

    Args:
        order: highest order used, 2 or 3 (default 3).
        form, variant, r1, r2: as :class:`SinglestepDPMSolver`.
    """

    order: int = 3

    def __post_init__(self) -> None:
        check_choice("order", self.order, (2, 3))
        super().__post_init__()

    def plan(
        self, *, steps: int | None, nfe: int | None, final_zero: bool, lower_order_final: bool
    ) -> list[int]:
        if nfe is None:
            return super().plan(
                steps=steps, nfe=None, final_zero=final_zero, lower_order_final=False
            )
        budget = check_int("nfe", nfe, minimum=1)
        orders = fast_orders(budget, self.order)
        if final_zero and orders[-1] != 1:
            orders = [*fast_orders(budget - 1, self.order), 1]
        return orders


for _prefix, _form, _label in FORM_FAMILIES:
    register(
        SolverInfo(
            name=f"{_prefix}_singlestep",
            cls=SinglestepDPMSolver,
            fixed={"form": _form},
            orders=(1, 2, 3),
            default_order=2,
            description=f"{_label} singlestep ({_form.value} prediction), order k costs k "
            "evaluations",
            reference="Lu et al. 2022, DPM-Solver Alg. 1-2; DPM-Solver++ Alg. 1 (2S)",
            configurations=(
                {"order": 1},
                {"order": 2, "variant": "midpoint"},
                {"order": 2, "variant": "heun"},
                {"order": 3, "variant": "midpoint"},
                {"order": 3, "variant": "heun"},
            ),
        ),
        aliases={f"{_prefix}_2s": {"order": 2}, f"{_prefix}_3s": {"order": 3}},
    )
    register(
        SolverInfo(
            name=f"{_prefix}_fast",
            cls=FastDPMSolver,
            fixed={"form": _form},
            orders=(2, 3),
            default_order=3,
            description=f"{_label}-fast: singlestep orders mixed to spend exactly the NFE budget",
            reference="Lu et al. 2022, DPM-Solver Sec. 3.4, App. D.2",
            configurations=({"order": 2}, {"order": 3}),
        )
    )
