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

The variable the polynomial is taken in (``mode``). In k-diffusion's variables the update is
``x~_t = x~_s + sum_j C_j eps_j`` with ``C_j = Int l_j(v) dsigma~`` over the step, ``l_j`` the
Lagrange basis in the interpolation variable ``v``:

- ``"logrho"`` (default): ``v = log sigma~ = -lambda``, diffusers' ``solver_type="logrho"``;
  the integrals are the exponential moments above (exact).
- ``"rhoab"``: ``v = sigma~`` (the paper's rho-AB); the integrals are Adams-Bashforth
  weights for the actual steps (exact; the variable-step iPNDM / LMS update of
  :mod:`.linear_multistep`).
- ``"tab"``: ``v = t``, the schedule's own time (the paper's t-AB; ComfyUI's
  ``deis_mode="tab"``, whose clock is a VP-SDE fitted to EDM's sigma range). The integrals
  ``Int l_j(t(sigma~)) dsigma~`` are taken by Gauss-Legendre quadrature in ``sigma~``, where
  ``t(sigma~)`` is smooth for the continuous schedules (for the VP-SDE ``t ~ sigma~^2`` near
  0, whose square root singularity a quadrature in ``t`` would meet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .._validate import check_choice
from ..schedules import Knot, NoiseSchedule
from .base import (
    Form,
    StepContext,
    combine,
    exponential_moments,
    lagrange_weights,
    sigma_step,
)
from .registry import SolverInfo, register
from .shapes import MultistepSolver, MultistepState

__all__ = ["DEIS", "time_weights"]

Mode = Literal["logrho", "tab", "rhoab"]

#: Gauss-Legendre points of the "tab" quadrature (in sigma~, over one step).
QUADRATURE_POINTS = 16


@lru_cache(maxsize=4)
def _gauss_legendre(n: int) -> tuple[Tensor, Tensor]:
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(nodes), torch.from_numpy(weights)


def time_weights(schedule: NoiseSchedule, knots: list[Knot], end: Knot) -> list[float]:
    """``C_j = Int_{sigma~_s}^{sigma~_end} l_j(t(sigma~)) dsigma~`` for the Lagrange basis
    ``l_j`` through the schedule times of ``knots`` (newest first, ``knots[0]`` the step's
    start): the weights of ``x~_end = x~_s + sum_j C_j eps_j`` (t-AB DEIS). Host float64."""
    a, b = knots[0].ksigma, end.ksigma
    nodes, weights = _gauss_legendre(QUADRATURE_POINTS)
    u = 0.5 * (a + b) + 0.5 * (b - a) * nodes  # sigma~ at the quadrature points
    tau = schedule.t_of_lambda(-torch.log(u))
    times = [k.t for k in knots]
    out = []
    for j, tj in enumerate(times):
        basis = torch.ones_like(tau)
        for m, tm in enumerate(times):
            if m != j:
                basis = basis * (tau - tm) / (tj - tm)
        out.append(0.5 * (b - a) * float((weights * basis).sum()))
    return out


@dataclass(frozen=True)
class DEIS(MultistepSolver):
    """DEIS of order 1-4 on the noise prediction (multistep, one evaluation per step,
    warm-up and lower-order final steps as the other multistep solvers).

    Args:
        order: 1 (DDIM), 2 (default, diffusers' default), 3 or 4.
        mode: the variable of the interpolating polynomial, ``"logrho"`` (default;
            diffusers'), ``"rhoab"`` (sigma~) or ``"tab"`` (the schedule's time; module
            docstring).
    """

    order: int = 2
    mode: Mode = "logrho"

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3, 4))
        check_choice("mode", self.mode, ("logrho", "tab", "rhoab"))

    def history_form(self) -> Form:
        return Form.NOISE

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        s, t = ctx.s, ctx.t
        preds = (m0, *state.preds[: k - 1])
        if self.mode == "rhoab":
            # Lagrange basis in sigma~, integrated exactly: Adams-Bashforth weights for the
            # actual steps (nodes as fractions of the step, plain moments 1/(i + 1)).
            dsig = t.ksigma - s.ksigma
            nodes = [0.0] + [(math.exp(-lam) - s.ksigma) / dsig for lam in state.lams[: k - 1]]
            w = lagrange_weights(nodes, [1.0 / (i + 1) for i in range(k)])
            return sigma_step(
                x, s.alpha, t.alpha, [(dsig * wj, m) for wj, m in zip(w, preds, strict=True)]
            )
        if self.mode == "tab":
            c = time_weights(ctx.schedule, [s, *state.knots[: k - 1]], t)
            return sigma_step(x, s.alpha, t.alpha, list(zip(c, preds, strict=True)))
        ratio, b, h = Form.NOISE.coefficients(s, t)
        step = t.lam - s.lam
        nodes = [0.0] + [(lam - s.lam) / step for lam in state.lams[: k - 1]]
        w = lagrange_weights(nodes, exponential_moments(h, k))
        return combine(x, ratio, [(b * wj, m) for wj, m in zip(w, preds, strict=True)])


register(
    SolverInfo(
        name="deis",
        cls=DEIS,
        orders=(1, 2, 3, 4),
        default_order=2,
        description="DEIS: exponential integrator on eps with integrated Lagrange polynomials "
        "in log sigma (= diffusers' DEISMultistepScheduler), sigma (rhoab) or time (tab)",
        reference="Zhang & Chen 2022, DEIS (arXiv 2204.13902), tAB- and rhoAB-DEIS",
        configurations=(
            {"order": 1},
            {"order": 2},
            {"order": 3},
            {"order": 3, "mode": "rhoab"},
            {"order": 3, "mode": "tab"},
            {"order": 4, "mode": "tab"},
        ),
    )
)
