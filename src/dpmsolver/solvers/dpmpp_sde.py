"""DPM-Solver++(2S) with ancestral noise in both sub-steps: k-diffusion's ``sample_dpmpp_sde``.

k-diffusion's "DPM-Solver++ (stochastic)" (also diffusers' ``DPMSolverSDEScheduler``) is a
singlestep second-order method built from two ancestral steps (see :mod:`.sde` for
``sigma_down`` / ``sigma_up``). In k-diffusion's variables ``x~ = x / alpha``,
``sigma~ = sigma / alpha``, with ``h = lambda_t - lambda_s``, the intermediate point ``s1`` at
``lambda_s + r1 h`` and ``fac = 1 / (2 r1)``:

    sub-step 1:  (d1, u1) = ancestral(s -> s1, eta)
                 x~_s1 = DDIM(x~_s, D_s; s -> d1) + s_noise u1 z(s, s1),   D_1 = D(x~_s1, s1)
    sub-step 2:  (d2, u2) = ancestral(s -> t, eta)
                 x~_t = DDIM(x~_s, (1 - fac) D_s + fac D_1; s -> d2) + s_noise u2 z(s, t)

where ``DDIM(x~, D; s -> d) = (sigma~_d / sigma~_s) x~ + (1 - sigma~_d / sigma~_s) D`` is the
first-order step. The two draws are for the overlapping intervals ``(s, s1)`` and
``(s, t)``: with a Brownian-tree noise source (k-diffusion's default for this sampler) they
are correlated as Brownian increments; with fresh draws they are independent. With
``eta = 0`` this is DPM-Solver++(2S) with the midpoint combination (DPM-Solver++ Alg. 1).

It differs from :class:`~.sde.SinglestepSDESolver` (``dpmpp_2s_sde``), the exponential
integrator of the SDE with Brownian-consistent noise, both in how ``eta`` enters (ancestral
``sigma_down`` here, ``h_eta = (1 + eta) h`` there; the two agree at ``eta = 1`` and 0) and
in the noise of the intermediate point, which here is not part of the step's increment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

from .._validate import check_choice, check_finite_float, check_non_negative
from ..schedules import Knot
from .base import Form, StepContext, first_order_step, rescale_to, step_noise
from .registry import SolverInfo, register
from .sde import ancestral_knots
from .shapes import SinglestepSolver

__all__ = ["DPMSolverSDE"]


@dataclass(frozen=True)
class DPMSolverSDE(SinglestepSolver):
    """k-diffusion's ``sample_dpmpp_sde``: DPM-Solver++(2S) from two ancestral sub-steps
    (module docstring). Two evaluations per step.

    Args:
        order: 2 (the only order; a step out of pure noise is one ancestral DDIM step).
        eta: ancestral noise fraction (default 1.0; 0 is DPM-Solver++(2S)).
        s_noise: scale of the injected noise (default 1.0).
        r1: intermediate point as a fraction of the step in lambda (default 1/2;
            k-diffusion's ``r``).
    """

    order: int = 2
    eta: float = 1.0
    s_noise: float = 1.0
    r1: float = 0.5

    def __post_init__(self) -> None:
        check_choice("order", self.order, (2,))
        check_non_negative("eta", self.eta)
        check_non_negative("s_noise", self.s_noise)
        if not 0.0 < check_finite_float("r1", self.r1) < 1.0:
            raise ValueError(f"r1 must lie in (0, 1), got {self.r1}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _ancestral(self, ctx: StepContext, x: Tensor, x0: Tensor, m: Tensor, end: Knot) -> Tensor:
        """DDIM with prediction ``m`` from ``ctx.s`` to ``sigma_down(s -> end)``, then
        ``sigma_up`` noise for the interval ``(s, end)``: the state at ``end``."""
        down, up = ancestral_knots(replace(ctx, t=end), self.eta)
        # back from the sigma_down knot to end's scale: x~ is shared, x = alpha x~
        out = rescale_to(first_order_step(Form.DATA, x, x0, m, ctx.s, down), down, end)
        if up == 0.0:
            return out
        return out.add(step_noise(ctx, ctx.s, end), alpha=end.alpha * up * self.s_noise)

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        s, t = ctx.s, ctx.t
        if ctx.order == 1 or not math.isfinite(s.lam) or not math.isfinite(t.lam):
            return self._ancestral(ctx, x, x0, x0, t), state
        s1 = ctx.schedule.knot_at_lambda(s.lam + self.r1 * (t.lam - s.lam))
        x1 = self._ancestral(ctx, x, x0, x0, s1)
        m1 = ctx.evaluate(x1, s1)
        fac = 0.5 / self.r1
        return self._ancestral(ctx, x, x0, x0 * (1.0 - fac) + m1 * fac, t), state


register(
    SolverInfo(
        name="dpmpp_sde",
        cls=DPMSolverSDE,
        orders=(2,),
        default_order=2,
        description="DPM-Solver++(2S) from two ancestral sub-steps (k-diffusion "
        "sample_dpmpp_sde); eta = 0 is DPM-Solver++(2S)",
        reference="Lu et al. 2022, DPM-Solver++ Alg. 1 (2S); k-diffusion sample_dpmpp_sde",
        configurations=({"order": 2}, {"order": 2, "eta": 0.5}),
    )
)
