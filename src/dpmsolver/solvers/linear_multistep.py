"""Linear multistep methods on ``d = eps_hat`` in ``sigma~``: iPNDM / LMS and PNDM / PLMS.

All of them integrate ``dx~/dsigma~ = d`` (see :mod:`.edm`) with Adams-Bashforth steps

    x~_t = x~_s + (sigma~_t - sigma~_s) sum_j w_j d_j,
    w_j = Int_0^1 l_j(tau) dtau,  l_j the Lagrange basis through the nodes tau_j

over the current and the last ``k - 1`` values of ``d`` (newest first), ``k`` the step's
order after warm-up. Two choices of nodes:

- ``coefficients="variable"``: ``tau_j = (sigma~_j - sigma~_s)/(sigma~_t - sigma~_s)``, the
  actual step sizes. The integral of the interpolating polynomial is exact, so a step of
  order k has local error O(h^(k+1)) on any grid. This is k-diffusion's ``sample_lms``
  (whose weights come from ``scipy.integrate.quad``; here the polynomial is integrated
  exactly) and the variable-step iPNDM ("iPNDM_v" of zju-pi's diff-solvers, ComfyUI's
  ``sample_ipndm_v``). That code's order-3 and order-4 weights contain
  ``(1 - h/(3(h + h1)) * R)/2`` with ``R = h(h + h1)/(h1(h1 + h2))``, which is the
  variable-step AB3 weight ``(1 - h/(3(h + h1))) * R/2`` only when the steps are equal, so
  on other grids its higher orders differ from this exact integration. Those weights are
  offered as ``coefficients="diff_sampler"`` (after the repository they come from,
  zju-pi/diff-sampler), so that ComfyUI's ``sample_ipndm_v`` can be reproduced; the
  order-2 weight is the exact one, the order-3 and order-4 ones are exact on equal steps.
- ``coefficients="fixed"``: ``tau_j = -j``, the classical Adams-Bashforth coefficients
  (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24) of PNDM's "PLMS" and of
  iPNDM (ComfyUI ``sample_ipndm``). They assume equal steps *in sigma~*, where they are
  the variable weights (tests/test_peers.py). On any other grid (uniform in time or in
  log-SNR, Karras) the step ratio ``h_n/h_(n-1) = 1 + O(h)``, the second-order weight is
  off by O(h), and the method is second order whatever its nominal order (measured 2.00
  for order 4; README table). At 10-30 steps the fixed weights are nevertheless sometimes
  the more accurate (on the exact mixture to t = 0 with 20 log-SNR steps: 3.5e-3 fixed vs
  9.9e-3 variable; at 100 steps 1.4e-4 vs 4.9e-5), as they extrapolate less aggressively
  after the steps shrink; hence both are offered, variable by default.

PNDM (Liu et al. 2022, "Pseudo numerical methods", arXiv 2202.09778) is written as "gradient part"
(the linear multistep combination ``e'`` of noise predictions) plus "transfer part" (the
DDIM step with ``e'`` in place of eps, their Eq. 9). DDIM is Euler in ``(sigma~, x~)``, so
PLMS is exactly the fixed-coefficient Adams-Bashforth step above; the PNDM family differs
only in its warm-up (:class:`PNDM`). iPNDM (Zhang & Chen 2022, in the DEIS paper) replaces
PNDM's Runge-Kutta warm-up by lower-order Adams-Bashforth steps, so every step costs one
evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from .._validate import check_choice
from ..schedules import Knot
from .base import Form, StepContext, heun_update, lagrange_weights, sigma_step
from .registry import SolverInfo, register
from .shapes import MultistepSolver, MultistepState

__all__ = ["PNDM", "LinearMultistep", "adams_weights", "diff_sampler_weights"]

Coefficients = Literal["variable", "fixed", "diff_sampler"]
Warmup = Literal["prk", "heun"]


def diff_sampler_weights(ksigmas: list[float], target: float) -> list[float]:
    """The variable-step weights of zju-pi/diff-sampler's iPNDM_v (ComfyUI's
    ``sample_ipndm_v``), in units of sigma~, for ``len(ksigmas)`` = 1 to 4 values of ``d``.

    With the steps ``h = target - sigma~_0`` and ``h_k = sigma~_{k-1} - sigma~_k`` (so
    ``q_k = h_k / h_{k+1}`` compares neighbouring steps), ``a = (2 + h/h1)/2`` and
    ``b = -(h/h1)/2`` are the exact variable-step AB2 weights; orders 3 and 4 add the terms
    ``T3`` and ``T4`` of that code, which reduce to the classical weights on equal steps.
    """
    h = target - ksigmas[0]
    if len(ksigmas) == 1:
        return [h]
    hs = [ksigmas[k - 1] - ksigmas[k] for k in range(1, len(ksigmas))]  # h1, h2, h3
    h1 = hs[0]
    weights = [(2.0 + h / h1) / 2.0, -(h / h1) / 2.0]
    if len(ksigmas) >= 3:
        h2 = hs[1]
        t3 = (1.0 - h / (3.0 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2.0
        weights[0] += t3
        weights[1] -= (1.0 + h1 / h2) * t3
        weights.append(t3 * h1 / h2)
    if len(ksigmas) == 4:
        h2, h3 = hs[1], hs[2]
        ratio = (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
        t4 = (
            (1.0 - h / (3.0 * (h + h1))) / 2.0
            + (1.0 - h / (2.0 * (h + h1))) * h / (6.0 * (h + h1 + h2))
        ) * ratio
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        weights[0] += t4
        weights[1] -= (1.0 + h1 / h2 + q) * t4
        weights[2] += (h1 / h2 + q * (1.0 + h2 / h3)) * t4
        weights.append(-t4 * q * h1 / h2)
    return [h * w for w in weights]


def adams_weights(ksigmas: list[float], target: float, coefficients: Coefficients) -> list[float]:
    """Weights ``c_j`` (in units of sigma~) of ``x~_t = x~_s + sum_j c_j d_j`` for values of
    ``d`` at ``ksigmas`` (newest first, ``ksigmas[0] = sigma~_s``) and ``target = sigma~_t``."""
    if coefficients == "diff_sampler":
        return diff_sampler_weights(ksigmas, target)
    dsig = target - ksigmas[0]
    if coefficients == "variable":
        nodes = [(sg - ksigmas[0]) / dsig for sg in ksigmas]
    else:
        nodes = [-float(j) for j in range(len(ksigmas))]
    moments = [1.0 / (i + 1) for i in range(len(nodes))]  # Int_0^1 tau^i dtau
    return [dsig * w for w in lagrange_weights(nodes, moments)]


@dataclass(frozen=True)
class LinearMultistep(MultistepSolver):
    """Adams-Bashforth on ``d = eps_hat`` in ``sigma~`` with lower-order warm-up: iPNDM
    (``coefficients="fixed"``, ComfyUI's ``sample_ipndm``) and its variable-step form
    (default; = iPNDM_v = k-diffusion's ``sample_lms``). One evaluation per step.

    Args:
        order: 1 (Euler = DDIM) to 4 (default 4).
        coefficients: ``"variable"`` (default; exact for the actual step sizes),
            ``"fixed"`` (classical AB weights; second order unless the grid is uniform in
            sigma~, see the module docstring) or ``"diff_sampler"`` (ComfyUI's
            ``sample_ipndm_v`` weights, :func:`diff_sampler_weights`).
    """

    # Adams-Bashforth in sigma~ is regular at sigma~ = 0, so the last step keeps its order
    # (k-diffusion's sample_lms integrates its polynomial down to 0 as well).
    steps_into_zero = True

    order: int = 4
    coefficients: Coefficients = "variable"

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2, 3, 4))
        check_choice("coefficients", self.coefficients, ("variable", "fixed", "diff_sampler"))

    @property
    def claimed_order(self) -> float:
        if self.coefficients == "fixed" and self.order > 2:
            # Fixed weights on a grid that is not uniform in sigma~ (the order test's
            # log-SNR grid): see the module docstring.
            return 2.0
        if self.coefficients == "diff_sampler" and self.order > 3:
            # Its order-4 weights are exact on equal steps only; on the log-SNR grid the
            # error of the third-difference weight is O(h): measured 2.86 (benchmarks).
            return 3.0
        return float(self.order)

    def history_form(self) -> Form:
        return Form.NOISE

    def update(
        self, ctx: StepContext, k: int, x: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        s, t = ctx.s, ctx.t
        ksigmas = [s.ksigma] + [math.exp(-lam) for lam in state.lams[: k - 1]]
        c = adams_weights(ksigmas, t.ksigma, self.coefficients)
        return sigma_step(
            x, s.alpha, t.alpha, list(zip(c, (m0, *state.preds[: k - 1]), strict=True))
        )


@dataclass(frozen=True)
class PNDM(LinearMultistep):
    """PNDM / PLMS (Liu et al. 2022): fourth-order linear multistep "gradient part" with
    the DDIM "transfer part" (their Eq. 9), after a warm-up that fills the history:

    - ``warmup="prk"`` (the paper's PNDM): three pseudo Runge-Kutta steps, each with
      evaluations at the start, twice at the midpoint (in schedule time, as the paper and
      diffusers place it) and at the end, combined as ``(e1 + 2 e2 + 2 e3 + e4)/6``:
      4 evaluations per warm-up step, 12 in all.
    - ``warmup="heun"`` (PLMS as in latent diffusion and diffusers'
      ``skip_prk_steps=True``): one pseudo improved Euler step (2 evaluations; this is
      EDM's Heun step in sigma~), then AB2 and AB3 while the history fills.

    Only the step's starting prediction is stored as history. The gradient part uses the
    classical fixed AB4 weights by default (``coefficients="fixed"``), which assume steps
    equal in sigma~ and leave the method second order on other grids;
    ``coefficients="variable"`` integrates for the actual steps (fourth order).

    Args:
        order: 4 (the only order).
        warmup: ``"prk"`` (default) or ``"heun"``.
        coefficients: ``"fixed"`` (default, the paper's) or ``"variable"``.
    """

    order: int = 4
    coefficients: Coefficients = "fixed"
    warmup: Warmup = "prk"

    def __post_init__(self) -> None:
        check_choice("order", self.order, (4,))
        check_choice("coefficients", self.coefficients, ("variable", "fixed"))
        check_choice("warmup", self.warmup, ("prk", "heun"))

    def step_evals(self, index: int, order: int) -> int:
        if self.warmup == "prk" and index < self.order - 1 and order == self.order:
            return 4
        if self.warmup == "heun" and index == 0 and order == 2:
            return 2
        return 1

    def plan(
        self, *, steps: int | None, nfe: int | None, final_zero: bool, lower_order_final: bool
    ) -> list[int]:
        """Full order throughout for ``"prk"`` (its warm-up steps are pseudo Runge-Kutta
        steps with RK4's weights); ``[2, 2, 3, 4, ...]`` for ``"heun"``. No lower-order final
        steps (the paper and diffusers have none). Given ``nfe``, the budget must be
        spent exactly by whole steps, warm-up included."""
        if steps is None:
            assert nfe is not None
            for n in range(1, nfe + 1):
                orders = self.plan(
                    steps=n, nfe=None, final_zero=final_zero, lower_order_final=False
                )
                cost = sum(self.step_evals(i, o) for i, o in enumerate(orders))
                if cost == nfe:
                    return orders
                if cost > nfe:
                    break
            raise ValueError(
                f"nfe={nfe} cannot be spent by whole PNDM steps with warmup={self.warmup!r} "
                f"(a 'prk' warm-up step costs 4 evaluations, a 'heun' one 2); pass steps=, or "
                "use solver='ipndm', whose warm-up costs nothing extra"
            )
        if self.warmup == "prk":
            orders = [self.order] * steps
        else:
            orders = [2] + [min(self.order, i + 1) for i in range(1, steps)]
        if final_zero:
            orders[-1] = 1
        return orders

    def advance(
        self, ctx: StepContext, k: int, x: Tensor, x0: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        """A warm-up step of more than one evaluation (PRK, or the pseudo improved Euler
        step of PLMS) from ``m0 = eps_hat``; afterwards the Adams-Bashforth step."""
        evals = self.step_evals(ctx.index, ctx.order)
        if evals == 1:
            return super().advance(ctx, k, x, x0, m0, state)
        if evals == 2:
            return heun_update(ctx, x, m0)
        return self._prk_update(ctx, x, m0)

    @staticmethod
    def _prk_update(ctx: StepContext, x: Tensor, e1: Tensor) -> Tensor:
        """PNDM's pseudo Runge-Kutta step: every stage transfers from ``x`` at ``s``."""
        s, t = ctx.s, ctx.t
        mid = ctx.schedule.knot(0.5 * (s.t + t.t))

        def stage(eps: Tensor, end: Knot) -> Tensor:
            # DDIM transfer of x from s to `end` with `eps`, then the prediction there.
            y = sigma_step(x, s.alpha, end.alpha, [(end.ksigma - s.ksigma, eps)])
            return Form.NOISE.prediction(ctx.evaluate(y, end), y, end)

        e2 = stage(e1, mid)
        e3 = stage(e2, mid)
        e4 = stage(e3, t)
        dsig = t.ksigma - s.ksigma
        return sigma_step(
            x, s.alpha, t.alpha, [(dsig / 6, e1), (dsig / 3, e2), (dsig / 3, e3), (dsig / 6, e4)]
        )


register(
    SolverInfo(
        name="ipndm",
        cls=LinearMultistep,
        orders=(1, 2, 3, 4),
        default_order=4,
        description="iPNDM / LMS: Adams-Bashforth on eps in sigma/alpha with lower-order "
        "warm-up; variable-step weights (default) or the classical fixed ones",
        reference="Zhang & Chen 2022, DEIS (iPNDM); Liu et al. 2022, PNDM (PLMS); "
        "k-diffusion sample_lms",
        configurations=(
            {"order": 1},
            {"order": 2},
            {"order": 3},
            {"order": 4},
            {"order": 4, "coefficients": "fixed"},
            {"order": 4, "coefficients": "diff_sampler"},
        ),
    ),
    aliases={"ipndm_v": {"coefficients": "variable"}, "lms": {"coefficients": "variable"}},
)

register(
    SolverInfo(
        name="pndm",
        cls=PNDM,
        orders=(4,),
        default_order=4,
        description="PNDM: pseudo Runge-Kutta warm-up (12 evaluations) then PLMS (fixed AB4 "
        "weights + DDIM transfer); warmup='heun' is PLMS",
        reference="Liu et al. 2022, PNDM (arXiv 2202.09778), Eq. 9 transfer; PRK / PLMS",
        configurations=(
            {"order": 4, "warmup": "prk"},
            {"order": 4, "warmup": "heun"},
            {"order": 4, "warmup": "prk", "coefficients": "variable"},
        ),
    ),
    aliases={"plms": {"warmup": "heun"}},
)
