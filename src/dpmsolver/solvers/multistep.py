"""Multistep DPM-Solver++ (data prediction) and DPM-Solver (noise prediction).

Lu et al. 2022, "DPM-Solver++", Alg. 2 and App. B; the noise-prediction multistep
variant is the same construction on eps (Form.NOISE). Past predictions ``m_i`` at
``lambda_i`` (newest ``m0`` at ``lambda_s``) replace the derivatives of the
exponential-integrator expansion:

    h = lambda_t - lambda_s,  h0 = lambda_s - lambda_1,  r0 = h0 / h
    D1_0 = (m0 - m1) / r0                       ~ h x0'
order 2 ("midpoint", Alg. 2):  x_t = (s_t/s_s) x - b phi_1 m0 - 1/2 b phi_1 D1_0
order 2 ("heun", Taylor):      x_t = (s_t/s_s) x - b phi_1 m0 + b phi_2 D1_0
order 3:  h1 = lambda_1 - lambda_2,  r1 = h1 / h,  D1_1 = (m1 - m2) / r1
          D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)    ~ h x0'
          D2 = (D1_0 - D1_1) / (r0 + r1)            ~ h^2 x0'' / 2   (half the 2nd derivative)
          x_t = (s_t/s_s) x - b phi_1 m0 + b phi_2 D1 - 2 b phi_3 D2

The factor 2 on the last term is ours. The official DPM-Solver code, diffusers and
k-diffusion's 3M use ``- b phi_3 D2``, i.e. half the second-derivative term of the
expansion; that update is only second order. With the factor the update integrates the
quadratic through (lambda_i, m_i) exactly (an exponential Adams-Bashforth method) and
measures third order (see tests/test_order.py and the README). The published variant is
kept as ``third_order="legacy"`` for reproducing other implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .._validate import check_choice
from ..schedules import Knot
from .base import Form, StepContext, combine, phi_functions
from .registry import FORM_FAMILIES, SolverInfo, register
from .shapes import MultistepSolver, MultistepState

__all__ = ["MultistepDPMSolver", "multistep_terms"]

Variant = Literal["midpoint", "heun"]
ThirdOrder = Literal["taylor", "legacy"]


@dataclass(frozen=True)
class MultistepDPMSolver(MultistepSolver):
    """Multistep DPM-Solver++ (``form=Form.DATA``) or DPM-Solver (``Form.NOISE``).

    Args:
        order: 1 (DDIM), 2 or 3.
        form: data prediction (DPM-Solver++) or noise prediction (DPM-Solver).
        variant: second-order update, ``"midpoint"`` (Alg. 2, diffusers' default) or
            ``"heun"`` (the Taylor form, diffusers' ``solver_type="heun"``).
        third_order: ``"taylor"`` (default, third order) or ``"legacy"`` (the published
            update with half the second-derivative term; second order).
    """

    order: int = 2
    form: Form = Form.DATA
    variant: Variant = "midpoint"
    third_order: ThirdOrder = "taylor"

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))
        check_choice("variant", self.variant, ("midpoint", "heun"))
        check_choice("third_order", self.third_order, ("taylor", "legacy"))

    @property
    def claimed_order(self) -> float:
        if self.order == 3 and self.third_order == "legacy":
            return 2.0
        return float(self.order)

    def history_form(self) -> Form:
        return self.form

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        ratio, b, h = self.form.coefficients(ctx.s, ctx.t)
        return combine(x, ratio, multistep_terms(self, k, ctx.s, h, b, m0, state))


def multistep_terms(
    solver: MultistepDPMSolver,
    k: int,
    s: Knot,
    h_phi: float,
    b: float,
    m0: Tensor,
    state: MultistepState,
    *,
    h_ratio: float | None = None,
) -> list[tuple[float, Tensor]]:
    """The prediction terms ``[(c_j, m_j)]`` of an order-``k`` multistep update (the part
    after ``ratio * x``), with the phi functions at ``h_phi`` and step ratios ``r = h_i / h``
    measured with ``h_ratio`` (default ``h_phi``; the SDE solver scales only the former, as
    in DPM-Solver++ App. B)."""
    h = h_phi if h_ratio is None else h_ratio
    phi_1, phi_2, phi_3 = phi_functions(h_phi)
    if k == 1:
        return [(-b * phi_1, m0)]
    sign = 1.0 if solver.form is Form.DATA else -1.0  # lambda runs backwards for eps
    r0 = sign * (s.lam - state.lams[0]) / h
    m1 = state.preds[0]
    if k == 2:
        # D1_0 = (m0 - m1) / r0
        c_d1 = -0.5 * b * phi_1 if solver.variant == "midpoint" else b * phi_2
        return [(-b * phi_1 + c_d1 / r0, m0), (-c_d1 / r0, m1)]
    r1 = sign * (state.lams[0] - state.lams[1]) / h
    m2 = state.preds[1]
    c_d2 = (2.0 if solver.third_order == "taylor" else 1.0) * -b * phi_3
    # Expand b phi_2 D1 + c_d2 D2 over (m0, m1, m2):
    # D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1,
    # D1 = (1 + w) D1_0 - w D1_1 with w = r0/(r0 + r1), D2 = (D1_0 - D1_1)/(r0 + r1)
    w = r0 / (r0 + r1)
    a0 = b * phi_2 * (1.0 + w) + c_d2 / (r0 + r1)  # coefficient of D1_0
    a1 = -b * phi_2 * w - c_d2 / (r0 + r1)  # coefficient of D1_1
    return [(-b * phi_1 + a0 / r0, m0), (-a0 / r0 + a1 / r1, m1), (-a1 / r1, m2)]


for _prefix, _form, _label in FORM_FAMILIES:
    register(
        SolverInfo(
            name=f"{_prefix}_multistep",
            cls=MultistepDPMSolver,
            fixed={"form": _form},
            orders=(1, 2, 3),
            default_order=2,
            description=f"{_label} multistep ({_form.value} prediction); order 3 uses the full "
            "second-derivative term (third order, unlike the published 3M)",
            reference="Lu et al. 2022, DPM-Solver++ Alg. 2 / App. B (multistep)",
            configurations=(
                {"order": 1},
                {"order": 2, "variant": "midpoint"},
                {"order": 2, "variant": "heun"},
                {"order": 3},
                {"order": 3, "third_order": "legacy"},
            ),
        ),
        aliases={f"{_prefix}_2m": {"order": 2}, f"{_prefix}_3m": {"order": 3}},
    )

register(
    SolverInfo(
        name="ddim",
        cls=MultistepDPMSolver,
        fixed={"form": Form.DATA, "variant": "midpoint", "third_order": "taylor"},
        orders=(1,),
        default_order=1,
        description="DDIM (deterministic, eta = 0) = first-order DPM-Solver(++) = Euler in "
        "(sigma/alpha, x/alpha)",
        reference="Song et al. 2021, DDIM Eq. 12; DPM-Solver++ Eq. 11; "
        "Karras et al. 2022, EDM Alg. 1",
        configurations=({"order": 1},),
    ),
    # EDM's / k-diffusion's Euler step x~ += (sigma~_t - sigma~_s) (x~ - D)/sigma~_s, with
    # x~ = x/alpha and sigma~ = sigma/alpha, is DDIM written in those variables: the same
    # update, so it is a name for this solver rather than a second implementation.
    aliases={"euler": {"order": 1}},
)
