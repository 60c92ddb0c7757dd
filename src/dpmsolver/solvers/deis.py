"""DEIS, the time-Adams-Bashforth exponential integrator on the noise prediction.

Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator"
(arXiv 2204.13902), the time-Adams-Bashforth method tAB-DEIS: the linear part of the
probability-flow ODE is integrated exactly and ``eps_hat`` is replaced by the polynomial
through its last ``k`` values, whose product with the exponential weight is integrated
exactly. diffusers' ``DEISMultistepScheduler`` (``algorithm_type="deis"``,
``solver_type="logrho"``) takes the polynomial in ``log rho = log(sigma/alpha) = -lambda``;
we take it in ``lambda``, the same polynomial. In the noise form of
:mod:`dpmsolver.solvers.base`, with ``tau = (lambda - lambda_s)/(lambda_t - lambda_s)`` and
nodes ``tau_j = (lambda_j - lambda_s)/(lambda_t - lambda_s)`` (0 for the newest value):

    x_t = (alpha_t/alpha_s) x_s + sigma_t sum_j w_j eps_j,
    w_j = sum_i c_ji mu_i   (c_ji: monomial coefficients of the Lagrange basis l_j,
                             mu_i = (-1)^(i+1) i! phi_{i+1}(h): base.exponential_moments)

Order 1 is DDIM. The order-2 update is the same arithmetic as DPM-Solver-2M in its
``variant="heun"`` form and the order-3 one as our (full-term) DPM-Solver-3M, both in the
noise form; the coefficients here come from the Lagrange integrals instead, which
tests/test_peers.py checks against both and against diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .._validate import check_choice
from .base import Form, StepContext, combine, exponential_moments, lagrange_weights
from .registry import SolverInfo, register
from .shapes import MultistepSolver, MultistepState

__all__ = ["DEIS"]


@dataclass(frozen=True)
class DEIS(MultistepSolver):
    """tAB-DEIS of order 1-3 on the noise prediction (multistep, one evaluation per step,
    warm-up and lower-order final steps as the other multistep solvers).

    Args:
        order: 1 (DDIM), 2 (default, diffusers' default) or 3.
    """

    order: int = 2

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3))

    def history_form(self) -> Form:
        return Form.NOISE

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        s, t = ctx.s, ctx.t
        ratio, b, h = Form.NOISE.coefficients(s, t)
        step = t.lam - s.lam
        nodes = [0.0] + [(lam - s.lam) / step for lam in state.lams[: k - 1]]
        w = lagrange_weights(nodes, exponential_moments(h, k))
        preds = (m0, *state.preds[: k - 1])
        return combine(x, ratio, [(b * wj, m) for wj, m in zip(w, preds, strict=True)])


register(
    SolverInfo(
        name="deis",
        cls=DEIS,
        orders=(1, 2, 3),
        default_order=2,
        description="DEIS tAB: exponential integrator on eps with exactly integrated "
        "Lagrange polynomials (= diffusers' DEISMultistepScheduler)",
        reference="Zhang & Chen 2022, DEIS (arXiv 2204.13902), tAB-DEIS",
        configurations=({"order": 1}, {"order": 2}, {"order": 3}),
    )
)
