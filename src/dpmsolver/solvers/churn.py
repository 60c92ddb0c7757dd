"""EDM's stochastic sampler: "churn" around an Euler, Heun or DPM-Solver-2 step.

Karras et al. 2022 ("EDM"), Alg. 2: before step i the state is moved up from its noise level
``t_i`` to ``t^_i = (1 + gamma_i) t_i`` by adding fresh noise of variance
``t^_i^2 - t_i^2`` (``gamma_i = min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]``,
else 0), the network is evaluated at ``t^_i`` and a deterministic step goes from ``t^_i`` to
``t_{i+1}``. k-diffusion's ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` with
``s_churn > 0`` are this with an Euler, a Heun (Alg. 2 itself) or a DPM-Solver-2 step.

The sampling loop evaluates the denoiser at the start of every step, at the step's start
knot, so here the knots of a grid are the levels the network is evaluated at (the churned
``t^_i``, in k-diffusion's sigmas ``sigma~ = sigma / alpha``) and the churn of a knot is the
*end* of the step into it. A step from knot ``s`` to knot ``t`` whose churn is ``gamma``:

    d:  sigma~_d = sigma~_t / (1 + gamma)                (the un-churned level t_{i+1})
    x_d = base step from s to d                           (Euler = DDIM, Heun, DPM-Solver-2)
    x~_t = x~_d + s_noise sqrt(sigma~_t^2 - sigma~_d^2) z (in the state x = alpha x~)

so the state at every knot is a sample at that knot's noise level. With ``gamma = 0`` a step
is the base solver's. The churn of the *first* knot (Alg. 2's ``t_0 -> t^_0``) happens
before any step; a run starts from a state at the first knot's level, which for data
started at ``t_0`` means adding that noise first (the k-diffusion front end does).

``gamma`` is one number for every knot, or a tuple with one value per knot of the run
(``gamma[k]`` is the churn of knot ``k``; missing entries are 0): Alg. 2's window
``[S_tmin, S_tmax]`` switches churn on and off along the run, which the k-diffusion front end
expresses this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor

from .._validate import check_choice, check_non_negative
from ..schedules import Knot
from .base import Form, StepContext, first_order_step, heun_update, rescale_to, step_noise
from .registry import SolverInfo, register
from .shapes import SinglestepSolver
from .singlestep import singlestep_update

__all__ = ["ChurnSolver"]

Base = Literal["euler", "heun", "dpm_2"]
_BASE_ORDER = {"euler": 1, "heun": 2, "dpm_2": 2}


def _check_gamma(gamma: Any) -> float | tuple[float, ...]:
    values = list(gamma) if isinstance(gamma, (tuple, list)) else [gamma]
    for i, g in enumerate(values):
        check_non_negative("gamma" if not isinstance(gamma, (tuple, list)) else f"gamma[{i}]", g)
    if isinstance(gamma, (tuple, list)):
        return tuple(float(g) for g in gamma)
    return float(gamma)


@dataclass(frozen=True)
class ChurnSolver(SinglestepSolver):
    """EDM's stochastic sampler (Karras et al. 2022, Alg. 2): a deterministic base step to the
    un-churned level, then churn noise up to the next knot (module docstring).

    Args:
        order: the base step's order (1 for ``"euler"``, 2 for ``"heun"`` and ``"dpm_2"``).
        base: ``"euler"`` (first order, = DDIM), ``"heun"`` (EDM Alg. 1-2: trapezoidal
            corrector, evaluated at the step's end) or ``"dpm_2"`` (noise-prediction
            DPM-Solver-2 with ``r1 = 1/2``, k-diffusion's ``sample_dpm_2``).
        gamma: churn ``gamma`` of every knot (default 0.25; EDM's
            ``min(S_churn / N, sqrt(2) - 1)``), or one value per knot (module docstring).
        s_noise: scale of the churn noise (default 1.0; EDM's ``S_noise``).
    """

    order: int = 2
    base: Base = "heun"
    gamma: float | tuple[float, ...] = 0.25
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        check_choice("base", self.base, tuple(_BASE_ORDER))
        check_choice(f"order (for base {self.base!r})", self.order, (_BASE_ORDER[self.base],))
        object.__setattr__(self, "gamma", _check_gamma(self.gamma))
        check_non_negative("s_noise", self.s_noise)

    @property
    def stochastic(self) -> bool:
        gammas = self.gamma if isinstance(self.gamma, tuple) else (self.gamma,)
        return any(g > 0 for g in gammas)

    def gamma_at(self, knot_index: int) -> float:
        """The churn of knot ``knot_index`` (the end of step ``knot_index - 1``)."""
        if isinstance(self.gamma, tuple):
            return self.gamma[knot_index] if knot_index < len(self.gamma) else 0.0
        return self.gamma

    def down_knot(self, ctx: StepContext) -> Knot:
        """The un-churned level ``d`` the base step goes to (``ctx.t`` without churn)."""
        gamma, t = self.gamma_at(ctx.index + 1), ctx.t
        if gamma == 0.0 or math.isinf(t.lam):
            return t
        if t.lam < ctx.s.lam:
            raise ValueError("churn needs decreasing noise levels (sampling, not inversion)")
        # sigma~_d = sigma~_t / (1 + gamma)  <=>  lambda_d = lambda_t + log(1 + gamma)
        return ctx.schedule.knot_at_lambda(t.lam + math.log1p(gamma))

    def base_step(self, ctx: StepContext, x: Tensor, x0: Tensor) -> Tensor:
        """The deterministic step from ``ctx.s`` to ``ctx.t`` (EDM Alg. 2, lines 6-10)."""
        eps = Form.NOISE.prediction(x0, x, ctx.s)  # EDM's d_i = (x - D) / t in x~ units
        if ctx.order == 1 or self.base == "euler":
            return first_order_step(Form.NOISE, x, x0, eps, ctx.s, ctx.t)
        if self.base == "heun":
            return heun_update(ctx, x, eps)
        out, _ = singlestep_update(ctx, Form.NOISE, x, x0, 2, r1=0.5, r2=1.0, variant="midpoint")
        return out

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        t = ctx.t
        down = self.down_knot(ctx)
        x_down = self.base_step(replace(ctx, t=down), x, x0)
        if down is t:
            return x_down, state
        # Churn from d up to t: x~ is shared, x = alpha x~; fresh noise of variance
        # sigma~_t^2 - sigma~_d^2 (EDM Alg. 2, lines 4-5, for the next step).
        z = step_noise(ctx, down, t)
        amplitude = t.alpha * math.sqrt(t.ksigma**2 - down.ksigma**2) * self.s_noise
        return rescale_to(x_down, down, t).add(z, alpha=amplitude), state


_REFERENCE = "Karras et al. 2022, EDM Alg. 2 (stochastic sampler, S_churn / S_noise)"
register(
    SolverInfo(
        name="euler_churn",
        cls=ChurnSolver,
        fixed={"base": "euler"},
        orders=(1,),
        default_order=1,
        description="EDM stochastic churn around Euler steps (k-diffusion sample_euler, "
        "s_churn > 0)",
        reference=_REFERENCE,
        configurations=({"order": 1},),
    )
)
register(
    SolverInfo(
        name="heun_churn",
        cls=ChurnSolver,
        fixed={"base": "heun"},
        orders=(2,),
        default_order=2,
        description="EDM's stochastic sampler: churn around Heun steps (k-diffusion "
        "sample_heun, s_churn > 0)",
        reference=_REFERENCE,
        configurations=({"order": 2},),
    )
)
register(
    SolverInfo(
        name="dpm_2_churn",
        cls=ChurnSolver,
        fixed={"base": "dpm_2"},
        orders=(2,),
        default_order=2,
        description="EDM stochastic churn around DPM-Solver-2 steps (k-diffusion sample_dpm_2, "
        "s_churn > 0)",
        reference=_REFERENCE + "; Lu et al. 2022, DPM-Solver Alg. 1",
        configurations=({"order": 2},),
    )
)
