"""EDM's deterministic Heun sampler, and the arithmetic of k-diffusion's variables.

Karras et al. 2022 ("EDM", Sec. 2-3 and Alg. 1) and k-diffusion write the probability-flow
ODE in ``x~ = x / alpha`` and ``sigma~ = sigma / alpha = exp(-lambda)``:

    dx~/dsigma~ = d(x~, sigma~),   d = (x~ - D(x~)) / sigma~ = (x - alpha x0_hat) / sigma = eps_hat

so ``d`` is the noise prediction. An update ``x~_t = x~_s + sum_j c_j d_j`` reads, in the
state ``x = alpha x~`` the sampling loop carries,

    x_t = (alpha_t / alpha_s) x_s + alpha_t sum_j c_j d_j              (:func:`sigma_step`)

Euler (``c = sigma~_t - sigma~_s``) is DDIM in these variables and is registered as the
``euler`` alias of ``ddim``. Heun (EDM Alg. 1, the deterministic sampler; Alg. 2 with
``S_churn = 0``) adds the trapezoidal correction with a second evaluation at the end of the
step:

    x~' = x~_s + (sigma~_t - sigma~_s) d_s,   d' = d(x~', sigma~_t)
    x~_t = x~_s + (sigma~_t - sigma~_s) (d_s + d') / 2

The step into ``sigma = 0`` (EDM's Euler-only last step, ``x~ = D``) is the loop's
data-prediction step, and a step out of pure noise (``sigma~ = inf``) is DDIM. The
arithmetic in these variables (:func:`~.base.sigma_step`, :func:`~.base.heun_update`) lives
in :mod:`.base`: PNDM's warm-up uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .._validate import check_choice
from .base import Form, StepContext, first_order_step, heun_update
from .registry import SolverInfo, register
from .shapes import SinglestepSolver

__all__ = ["Heun"]


@dataclass(frozen=True)
class Heun(SinglestepSolver):
    """EDM's deterministic second-order Heun sampler (Karras et al. 2022, Alg. 1;
    k-diffusion's ``sample_heun`` with ``s_churn = 0``): 2 evaluations per step.

    Args:
        order: 2 (the only order; a step out of pure noise falls back to Euler = DDIM).
    """

    order: int = 2

    def __post_init__(self) -> None:
        check_choice("order", self.order, (2,))

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        d_s = Form.NOISE.prediction(x0, x, ctx.s)
        if ctx.order == 1:
            return first_order_step(Form.NOISE, x, x0, d_s, ctx.s, ctx.t), state
        return heun_update(ctx, x, d_s), state


register(
    SolverInfo(
        name="heun",
        cls=Heun,
        orders=(2,),
        default_order=2,
        description="EDM Heun: Euler predictor + trapezoidal corrector in sigma/alpha, "
        "2 evaluations per step",
        reference="Karras et al. 2022, EDM Alg. 1 (deterministic Heun)",
        configurations=({"order": 2},),
    )
)
