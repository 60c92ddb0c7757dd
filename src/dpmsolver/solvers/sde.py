"""Stochastic solvers: SDE-DPM-Solver++ (multistep and singlestep) and ancestral steps.

**SDE-DPM-Solver++** (Lu et al. 2022, "DPM-Solver++", App. B / Eq. for SDE-DPM-Solver++2M;
k-diffusion's ``eta`` generalisation). For the reverse SDE family with noise fraction
``eta`` (0: the probability-flow ODE, 1: the reverse-time SDE) the exponential integrator
in data-prediction form is

    x_t = (sigma_t/sigma_s) e^{-eta h} x_s - alpha_t [phi_1 m0 - phi_2 (h D') + ...](h_eta)
          + sigma_t sqrt(-expm1(-2 eta h)) z,        h_eta = (1 + eta) h,

i.e. the ODE update with every phi function evaluated at ``h_eta``, the state decayed by an
extra ``e^{-eta h}``, and fresh Gaussian noise. ``eta = 0`` is literally the ODE solver; the
multistep class therefore *is* :class:`~.multistep.MultistepDPMSolver`'s arithmetic with
these three changes. SDE-DPM-Solver++(1) with ``eta = 1`` is DDPM ancestral sampling.

The singlestep 2S variant splits the step's Brownian increment at the intermediate point
so that the noise injected on the way to ``s1`` is part of the noise of the whole step
(consistent increments: the intermediate evaluation sits on the same sample path).

**Ancestral** steps (k-diffusion's ``get_ancestral_step``): in k-diffusion sigmas,
``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))`` and
``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; a deterministic step to ``sigma_down`` is
followed by ``sigma_up`` noise. Used by ``euler_ancestral``, ``dpmpp_2s_ancestral`` and
``dpm_2_ancestral``.

``s_noise`` (k-diffusion's name) scales the injected noise; 1 (the default) is the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from torch import Tensor

from .._validate import check_choice, check_non_negative
from ..schedules import Knot
from .base import Form, Solver, StepContext, combine, phi_functions, rescale_to, step_noise
from .multistep import MultistepDPMSolver, multistep_terms
from .registry import SolverInfo, register
from .shapes import MultistepState, SinglestepSolver
from .singlestep import SinglestepDPMSolver

__all__ = ["AncestralSolver", "MultistepSDESolver", "SinglestepSDESolver", "ancestral_knots"]

Variant = Literal["midpoint", "heun"]


@dataclass(frozen=True)
class MultistepSDESolver(MultistepDPMSolver):
    """SDE-DPM-Solver++ multistep (data prediction), orders 1-3 (2M SDE, 3M SDE).

    Args:
        order, variant, third_order: as :class:`~.multistep.MultistepDPMSolver`.
        eta: noise fraction (default 1.0; 0 gives the ODE solver exactly).
        s_noise: scale of the injected noise (default 1.0, the method; k-diffusion's
            ``s_noise``).
    """

    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_non_negative("eta", self.eta)
        check_non_negative("s_noise", self.s_noise)
        if self.form is not Form.DATA:
            raise ValueError("the SDE solvers integrate the data prediction (form=Form.DATA)")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def advance(
        self, ctx: StepContext, k: int, x: Tensor, x0: Tensor, m0: Tensor, state: MultistepState
    ) -> Tensor:
        if self.eta == 0:
            return super().advance(ctx, k, x, x0, m0, state)
        s, t = ctx.s, ctx.t
        h = t.lam - s.lam  # inf out of pure noise: then x_t = alpha_t x0 + sigma_t z
        ratio = (t.sigma / s.sigma) * math.exp(-self.eta * h)
        terms = multistep_terms(self, k, s, (1.0 + self.eta) * h, t.alpha, x0, state, h_ratio=h)
        out = combine(x, ratio, terms)
        amplitude = t.sigma * math.sqrt(-math.expm1(-2.0 * self.eta * h)) * self.s_noise
        return out.add(step_noise(ctx, s, t), alpha=amplitude)


@dataclass(frozen=True)
class SinglestepSDESolver(SinglestepSolver):
    """SDE-DPM-Solver++(2S): one intermediate evaluation at ``r1 h``, consistent noise.

    Args:
        eta: noise fraction (default 1.0; 0 gives DPM-Solver++(2S) midpoint exactly).
        r1: intermediate point as a fraction of the step (default 1/2).
    """

    order: int = 2
    form: Form = Form.DATA
    eta: float = 1.0
    r1: float = 0.5

    def __post_init__(self) -> None:
        check_choice("order", self.order, (1, 2))
        check_non_negative("eta", self.eta)
        if not 0.0 < self.r1 < 1.0:
            raise ValueError(f"r1 must lie in (0, 1), got {self.r1}")

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        s, t = ctx.s, ctx.t
        if self.eta == 0:
            return SinglestepDPMSolver(order=self.order, r1=self.r1).step(ctx, x, x0, state)
        eta, h = self.eta, t.lam - s.lam
        # Brownian increment of the step, split at s1: z = e^{-eta (1 - r1) h} c1 z1 + c2 z2
        c1 = math.sqrt(-math.expm1(-2.0 * eta * self.r1 * h)) if ctx.order == 2 else 0.0
        c2 = math.sqrt(-math.expm1(-2.0 * eta * (1.0 - self.r1) * h)) if ctx.order == 2 else 0.0
        p1 = phi_functions((1.0 + eta) * h)[0]
        ratio = (t.sigma / s.sigma) * math.exp(-eta * h)
        if ctx.order == 1:
            out = combine(x, ratio, [(-t.alpha * p1, x0)])
            return out.add(
                step_noise(ctx, s, t), alpha=t.sigma * math.sqrt(-math.expm1(-2.0 * eta * h))
            ), state
        s1 = ctx.schedule.knot_at_lambda(s.lam + self.r1 * h)
        z1 = step_noise(ctx, s, s1)
        u = combine(
            x,
            (s1.sigma / s.sigma) * math.exp(-eta * self.r1 * h),
            [(-s1.alpha * phi_functions((1.0 + eta) * self.r1 * h)[0], x0)],
        )
        u = u.add(z1, alpha=s1.sigma * c1)
        m1 = ctx.evaluate(u, s1)
        # midpoint combination (DPM-Solver++ 2S) with phi at h_eta
        c = -0.5 / self.r1 * t.alpha * p1
        out = combine(x, ratio, [(-t.alpha * p1 - c, x0), (c, m1)])
        out = out.add(z1, alpha=t.sigma * math.exp(-eta * (1.0 - self.r1) * h) * c1)
        return out.add(step_noise(ctx, s1, t), alpha=t.sigma * c2), state


def ancestral_knots(ctx: StepContext, eta: float) -> tuple[Knot, float]:
    """``(down, sigma_up)`` for an ancestral step from ``ctx.s`` to ``ctx.t`` in k-diffusion
    sigmas (``sigma_up`` is in k-diffusion units, i.e. relative to alpha_t)."""
    s_from, s_to = ctx.s.ksigma, ctx.t.ksigma
    if not math.isfinite(s_from):
        return ctx.t, 0.0
    up = min(s_to, eta * math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0)))
    down = math.sqrt(max(s_to**2 - up**2, 0.0))
    # eta > 1 can take all of sigma_to as noise: the deterministic part goes to sigma = 0.
    return ctx.schedule.knot_at_lambda(-math.log(down) if down > 0 else math.inf), up


@dataclass(frozen=True)
class AncestralSolver(SinglestepSolver):
    """Ancestral sampling around a singlestep base solver: deterministic step to
    ``sigma_down`` then ``sigma_up`` noise (k-diffusion ``sample_euler_ancestral`` /
    ``sample_dpmpp_2s_ancestral`` / ``sample_dpm_2_ancestral``).

    Args:
        base: ``"ddim"`` (Euler ancestral), ``"dpmpp_2s"`` (DPM-Solver++(2S) ancestral) or
            ``"dpm_2"`` (DPM-Solver-2 ancestral: the noise-prediction singlestep solver with
            ``r1 = 1/2``, i.e. k-diffusion's ``sample_dpm_2`` step).
        eta: ancestral noise fraction (default 1.0; 0 gives the base solver).
        s_noise: scale of the injected noise (default 1.0; k-diffusion's ``s_noise``).
    """

    order: int = 1
    base: Literal["ddim", "dpmpp_2s", "dpm_2"] = "ddim"
    eta: float = 1.0
    s_noise: float = 1.0

    def __post_init__(self) -> None:
        check_choice("base", self.base, ("ddim", "dpmpp_2s", "dpm_2"))
        check_non_negative("eta", self.eta)
        check_non_negative("s_noise", self.s_noise)
        check_choice("order", self.order, (1,) if self.base == "ddim" else (1, 2))

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def _base(self) -> Solver:
        if self.base == "dpm_2":
            return SinglestepDPMSolver(order=self.order, form=Form.NOISE)
        return SinglestepDPMSolver(order=self.order)

    def step(self, ctx: StepContext, x: Tensor, x0: Tensor, state: Any) -> tuple[Tensor, Any]:
        if self.eta == 0:
            return self._base().step(ctx, x, x0, state)
        down, up = ancestral_knots(ctx, self.eta)
        order = ctx.order if down.lam < math.inf else 1
        x_down, _ = self._base().step(replace(ctx, t=down, order=order), x, x0, state)
        # back from the sigma_down knot to t's scale: x~ is shared, x = alpha x~
        out = rescale_to(x_down, down, ctx.t)
        return out.add(step_noise(ctx, ctx.s, ctx.t), alpha=ctx.t.alpha * up * self.s_noise), state


register(
    SolverInfo(
        name="dpmpp_multistep_sde",
        cls=MultistepSDESolver,
        fixed={"form": Form.DATA},
        orders=(1, 2, 3),
        default_order=2,
        description="SDE-DPM-Solver++ multistep (2M SDE, 3M SDE); eta = 0 is the ODE solver, "
        "order 1 with eta = 1 is DDPM",
        reference="Lu et al. 2022, DPM-Solver++ App. B (SDE-DPM-Solver++2M); k-diffusion eta",
        configurations=(
            {"order": 1},
            {"order": 2},
            {"order": 2, "variant": "heun"},
            {"order": 3},
            {"order": 2, "eta": 0.5},
        ),
    ),
    aliases={"dpmpp_2m_sde": {"order": 2}, "dpmpp_3m_sde": {"order": 3}, "ddpm": {"order": 1}},
)
register(
    SolverInfo(
        name="dpmpp_2s_sde",
        cls=SinglestepSDESolver,
        fixed={"form": Form.DATA},
        orders=(1, 2),
        default_order=2,
        description="SDE-DPM-Solver++(2S) singlestep with Brownian-consistent noise",
        reference="Lu et al. 2022, DPM-Solver++ App. B; DPM-Solver-v3 App. (SDE singlestep)",
        configurations=({"order": 2}, {"order": 2, "eta": 0.5}),
    )
)
register(
    SolverInfo(
        name="euler_ancestral",
        cls=AncestralSolver,
        fixed={"base": "ddim"},
        orders=(1,),
        default_order=1,
        description="Euler ancestral (k-diffusion): DDIM to sigma_down plus sigma_up noise",
        reference="Karras et al. 2022 / k-diffusion sample_euler_ancestral",
        configurations=({"order": 1},),
    )
)
register(
    SolverInfo(
        name="dpmpp_2s_ancestral",
        cls=AncestralSolver,
        fixed={"base": "dpmpp_2s"},
        orders=(1, 2),
        default_order=2,
        description="DPM-Solver++(2S) ancestral (k-diffusion)",
        reference="Lu et al. 2022, DPM-Solver++ Alg. 1; k-diffusion sample_dpmpp_2s_ancestral",
        configurations=({"order": 2},),
    )
)
register(
    SolverInfo(
        name="dpm_2_ancestral",
        cls=AncestralSolver,
        fixed={"base": "dpm_2"},
        orders=(1, 2),
        default_order=2,
        description="DPM-Solver-2 ancestral (k-diffusion): noise-prediction DPM-Solver-2 "
        "(r1 = 1/2) to sigma_down plus sigma_up noise",
        reference="Lu et al. 2022, DPM-Solver Alg. 1; k-diffusion sample_dpm_2_ancestral",
        configurations=({"order": 2},),
    )
)
