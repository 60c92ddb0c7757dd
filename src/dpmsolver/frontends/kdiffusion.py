"""k-diffusion / ComfyUI sampler functions over dpmsolver's solvers.

Every sampler function of k-diffusion 0.1.1's ``sampling.py`` and the extra names ComfyUI
offers, with the same signatures: ``sample_dpmpp_2m(model, x, sigmas, extra_args=None,
callback=None, disable=None)`` and its siblings take a denoiser ``model(x, sigma,
**extra_args) -> x0`` in k-diffusion's variables (``x~ = x / alpha``, ``sigma~ = sigma /
alpha``; Karras et al. 2022, Sec. 2), which makes every problem a variance-exploding one.
Each function is a plain ``def`` that builds a registered solver (:mod:`dpmsolver.solvers`)
and runs it with :func:`dpmsolver.solve` on ``sigmas`` resolved as a
:class:`~dpmsolver.schedules.VESchedule` grid; the arithmetic of every step is the
solver's. Decreasing sigmas sample (a trailing 0 ends with ``x = denoised``); increasing
sigmas invert (the deterministic samplers).

A function named after a peer's computes what the peer computes, by default (the tests
compare every k-diffusion name with k-diffusion to 1e-6). Where our solver differs on
purpose, the docstring says so and names the option that gives ours:

==============================  =====================================================
name                            registered solver (default options)
==============================  =====================================================
sample_euler, sample_ddim       ``ddim``; ``euler_churn`` when ``s_churn > 0`` (EDM Alg. 2)
sample_heun                     ``heun``; ``heun_churn`` when ``s_churn > 0``
sample_dpm_2                    ``dpm_singlestep`` order 2; ``dpm_2_churn``
sample_euler_ancestral          ``euler_ancestral``
sample_dpm_2_ancestral          ``dpm_2_ancestral``
sample_dpmpp_2s_ancestral       ``dpmpp_2s_ancestral``
sample_lms                      ``lms`` (Adams-Bashforth in sigma~, actual steps)
sample_dpm_fast                 ``dpm_fast`` steps in k-diffusion's DPM-Solver driver
sample_dpm_adaptive             ``dpm_adaptive`` attempts under k-diffusion's PID control
sample_dpmpp_sde[_gpu]          ``dpmpp_sde`` (ours: ``dpmpp_2s_sde``)
sample_dpmpp_2m                 ``dpmpp_multistep`` order 2
sample_dpmpp_2m_sde[_gpu]       ``dpmpp_multistep_sde`` order 2
sample_dpmpp_3m_sde[_gpu]       ``dpmpp_multistep_sde`` order 3, published update
sample_dpmpp_3m                 ``dpmpp_multistep`` order 3 (ours: third order)
sample_uni_pc, _bh2             ``unipc`` order min(3, steps - 1), bh1 / bh2 (ComfyUI)
sample_ipndm, sample_ipndm_v    ``ipndm``, fixed / ``diff_sampler`` weights (ComfyUI)
sample_deis                     ``deis`` mode ``tab`` (ComfyUI's clock) or ``rhoab``
sample_ddpm                     ``ddpm`` = SDE-DPM-Solver++(1), eta = 1 (ComfyUI)
==============================  =====================================================

Noise. Stochastic solvers ask for the noise of an interval of the run (``ctx.noise(a, b)``,
:mod:`dpmsolver.noise`), so k-diffusion's ``noise_sampler(sigma, sigma_next)`` plugs in
as it is, a ``BrownianTreeNoiseSampler`` included; it is asked for exactly the intervals
k-diffusion asks it for. Without one, each function uses k-diffusion's default: fresh
``torch.randn_like`` draws for the ancestral samplers, ``sample_ddpm`` and EDM's churn, and a
Brownian tree over ``[min sigma > 0, max sigma]`` with a seed drawn from torch's global
generator for the SDE samplers (built with ``torchsde``, as k-diffusion's; fresh draws if
``torchsde`` is not installed). Drawn in k-diffusion's order, the defaults give k-diffusion's
samples for the same ``torch.manual_seed``.

Every function runs under ``torch.no_grad()``, as k-diffusion's do: no autograd graph is
kept. ``callback`` receives k-diffusion's dict once per step (``x`` is the state the step
starts from); ``disable`` turns the progress bar off (None: only on a terminal).

Also here: sigma grids with k-diffusion's signatures, built on :func:`dpmsolver.make_grid`,
and wrappers that turn discrete-time eps / v DDPM networks into k-diffusion denoisers.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor

from .._validate import check_choice, check_finite_float, check_int, check_non_negative
from ..loop import StepInfo, solve
from ..parameterization import PREDICTIONS, Prediction, data_coefficients
from ..plan import Plan, plan_steps, solver_orders
from ..progress import Progress
from ..schedules import ContinuousVPSchedule, DiscreteVPSchedule, Knot, NoiseSchedule, VESchedule
from ..solvers import AdaptiveSolver, Solver, StepContext, get_solver
from ..timegrid import GridKind, grid_from_sigmas, make_grid

__all__ = [
    "SAMPLERS",
    "UNAVAILABLE",
    "DiscreteDDPMDenoiser",
    "DiscreteEpsDDPMDenoiser",
    "DiscreteVDDPMDenoiser",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_logsnr",
    "get_sigmas_polyexponential",
    "get_sigmas_schedule",
    "get_sigmas_vp",
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_3m_sde_gpu",
    "sample_dpmpp_sde",
    "sample_dpmpp_sde_gpu",
    "sample_dpmv3",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_lms",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
]

KModel = Callable[..., Tensor]
KCallback = Callable[[dict[str, Any]], Any]
KNoiseSampler = Callable[[Tensor, Tensor], Tensor]
NoiseSource = Callable[[Tensor, Knot, Knot], Tensor]

#: Each sampler function and the registered solvers it runs (the first by default).
SAMPLERS: dict[str, tuple[str, ...]] = {
    "sample_euler": ("ddim", "euler_churn"),
    "sample_euler_ancestral": ("euler_ancestral",),
    "sample_heun": ("heun", "heun_churn"),
    "sample_dpm_2": ("dpm_singlestep", "dpm_2_churn"),
    "sample_dpm_2_ancestral": ("dpm_2_ancestral",),
    "sample_lms": ("lms",),
    "sample_dpm_fast": ("dpm_fast",),
    "sample_dpm_adaptive": ("dpm_adaptive",),
    "sample_dpmpp_2s_ancestral": ("dpmpp_2s_ancestral",),
    "sample_dpmpp_sde": ("dpmpp_sde",),
    "sample_dpmpp_2m": ("dpmpp_multistep",),
    "sample_dpmpp_2m_sde": ("dpmpp_multistep_sde",),
    "sample_dpmpp_3m_sde": ("dpmpp_multistep_sde",),
    "sample_dpmpp_3m": ("dpmpp_multistep",),
    "sample_dpmv3": ("dpmv3",),
    "sample_ddim": ("ddim", "euler_churn"),
    "sample_uni_pc": ("unipc",),
    "sample_uni_pc_bh2": ("unipc",),
    "sample_ipndm": ("ipndm",),
    "sample_ipndm_v": ("ipndm",),
    "sample_deis": ("deis",),
    "sample_ddpm": ("ddpm",),
    "sample_dpmpp_2m_sde_gpu": ("dpmpp_multistep_sde",),
    "sample_dpmpp_3m_sde_gpu": ("dpmpp_multistep_sde",),
    "sample_dpmpp_sde_gpu": ("dpmpp_sde",),
}

#: Names that cannot be offered (kept for compatibility; every name above is available).
UNAVAILABLE: dict[str, str] = {}


# --------------------------------------------------------------------------------------
# The shared runner
# --------------------------------------------------------------------------------------


class _Levels:
    """The user's sigmas: host floats for the grid, and the tensors themselves, so that the
    model and a noise sampler see exactly k-diffusion's values at the grid's knots."""

    def __init__(self, sigmas: Tensor | Sequence[float]) -> None:
        t = torch.as_tensor(sigmas)
        if t.ndim != 1 or t.numel() < 2:
            raise ValueError(
                f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            t = t.to(torch.get_default_dtype())
        self.tensor = t
        self.values: list[Tensor] = list(t.unbind())
        self.floats = [float(v) for v in t.to(torch.float64).tolist()]
        self.by_lam: dict[float, Tensor] = {}

    @property
    def steps(self) -> int:
        return len(self.floats) - 1

    def pin(self, knots: Sequence[Knot], values: Sequence[Tensor]) -> None:
        """Remember which tensor each knot stands for."""
        for k, v in zip(knots, values, strict=True):
            self.by_lam[k.lam] = v

    def at(self, knot: Knot) -> Tensor:
        """The sigma tensor of ``knot``: the user's own at a grid knot, else computed."""
        if knot.lam in self.by_lam:
            return self.by_lam[knot.lam]
        value = 0.0 if knot.lam == math.inf else knot.sigma / knot.alpha
        return torch.tensor(value, dtype=self.tensor.dtype, device=self.tensor.device)


class _KDenoiser:
    """A k-diffusion denoiser ``model(x, sigma, **extra_args)`` as a dpmsolver denoiser. The
    schedules here have ``alpha = 1``, so the state is k-diffusion's ``x``."""

    def __init__(
        self, model: KModel, extra_args: Mapping[str, Any] | None, levels: _Levels | None = None
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model = model
        self.extra_args = dict(extra_args or {})
        self.levels = levels

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        sigma = self.levels.at(knot) if self.levels is not None else knot.sigma
        return self.model(x, x.new_ones([x.shape[0]]) * sigma, **self.extra_args)


class _Reporter:
    """k-diffusion's callback dict, from the loop's after-step :class:`StepInfo`: ``x`` is
    the state the step started from, as k-diffusion reports it."""

    def __init__(
        self,
        callback: KCallback | None,
        x: Tensor,
        sigmas: Sequence[Tensor],
        sigma_hats: Sequence[Tensor] | None = None,
    ) -> None:
        self.callback = callback
        self.x = x
        self.sigmas = sigmas
        self.sigma_hats = sigmas if sigma_hats is None else sigma_hats

    def __call__(self, info: StepInfo) -> None:
        if self.callback is not None:
            i = info.index
            self.callback(
                {
                    "x": self.x,
                    "i": i,
                    "sigma": self.sigmas[i],
                    "sigma_hat": self.sigma_hats[i],
                    "denoised": info.denoised,
                }
            )
        self.x = info.x


def _show_progress(disable: bool | None) -> bool:
    # k-diffusion passes disable to tqdm, where None means "only on a terminal".
    return (not disable) if disable is not None else sys.stderr.isatty()


def _schedule_for(levels: Sequence[float]) -> VESchedule:
    positive = [v for v in levels if v > 0]
    if not positive:
        raise ValueError("sigmas must contain a positive value")
    lo, hi = min(positive), max(positive)
    return VESchedule(lo if lo < hi else hi / 2, hi)


def _range_schedule(sigma_min: float, sigma_max: float) -> VESchedule:
    lo = check_finite_float("sigma_min", sigma_min, positive=True)
    hi = check_finite_float("sigma_max", sigma_max, positive=True)
    if not lo < hi:
        raise ValueError(f"sigma_min={lo} must be < sigma_max={hi}")
    return VESchedule(lo, hi)


def _run(
    model: KModel,
    x: Tensor,
    levels: _Levels,
    solver: Solver,
    *,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    noise: NoiseSource | None = None,
    lower_order_final: bool = False,
    final_first_order: bool = False,
    schedule: NoiseSchedule | None = None,
) -> Tensor:
    """Run ``solver`` over the user's sigmas: the common body of the sampler functions.

    k-diffusion's samplers keep their order to the end (``lower_order_final=False``); only a
    step to sigma = 0 is the data-prediction step (``final_first_order`` makes it so for
    Adams-Bashforth in sigma~, which could integrate into it).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    grid = grid_from_sigmas(schedule or _schedule_for(levels.floats), levels.floats)
    levels.pin(grid.knots, levels.values)
    orders = solver_orders(
        solver, steps=grid.steps, final_zero=grid.final_zero, lower_order_final=lower_order_final
    )
    if final_first_order and grid.final_zero:
        orders[-1] = 1
    result = solve(
        _KDenoiser(model, extra_args, levels),
        x,
        grid,
        solver,
        orders=orders,
        noise_sampler=noise if solver.stochastic else None,
        callback=_Reporter(callback, x, levels.values),
        progress=_show_progress(disable),
    )
    return result.x


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


def _fresh(x: Tensor, s: Knot, t: Knot) -> Tensor:
    """k-diffusion's ``default_noise_sampler``: a fresh ``randn_like`` draw per call."""
    return torch.randn_like(x)


class _IntervalNoise:
    """A k-diffusion ``noise_sampler(sigma, sigma_next)`` as a noise source: asked for the
    interval the solver draws for, with k-diffusion's sigma tensors at the grid's knots."""

    def __init__(self, sampler: KNoiseSampler, levels: _Levels) -> None:
        self.sampler = sampler
        self.levels = levels

    def __call__(self, x: Tensor, s: Knot, t: Knot) -> Tensor:
        return self.sampler(self.levels.at(s), self.levels.at(t))


class _BrownianTree:
    """k-diffusion's default noise for its SDE samplers (``BrownianTreeNoiseSampler(x,
    sigma_min, sigma_max)``): one ``torchsde.BrownianTree`` over ``[sigma_min, sigma_max]``,
    seeded from torch's global generator, returning the normalized increment
    ``(W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma|``."""

    def __init__(self, x: Tensor, sigma_min: Tensor, sigma_max: Tensor) -> None:
        import torchsde  # optional: only the SDE samplers' default needs it

        seed = int(torch.randint(0, 2**63 - 1, []).item())
        self.tree = torchsde.BrownianTree(sigma_min, torch.zeros_like(x), sigma_max, entropy=seed)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        lo, hi, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        return self.tree(lo, hi) * sign / (hi - lo).abs().sqrt()


def _noise(
    noise_sampler: KNoiseSampler | None, levels: _Levels, x: Tensor, *, brownian: bool
) -> NoiseSource:
    """The noise source of a run: the caller's ``noise_sampler``, else k-diffusion's default
    for the function (a Brownian tree for the SDE samplers, fresh draws otherwise)."""
    if noise_sampler is not None:
        if not callable(noise_sampler):
            raise TypeError(
                "noise_sampler must be callable as noise_sampler(sigma, sigma_next), got "
                f"{type(noise_sampler).__name__}"
            )
        return _IntervalNoise(noise_sampler, levels)
    if brownian:
        positive = levels.tensor[levels.tensor > 0]
        try:
            tree = _BrownianTree(x, positive.min(), levels.tensor.max())
        except ImportError:
            return _fresh
        return _IntervalNoise(tree, levels)
    return _fresh


# --------------------------------------------------------------------------------------
# Euler, Heun, DPM-Solver-2 and EDM's churn
# --------------------------------------------------------------------------------------

_EDM_SOLVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("ddim", {}),
    "heun": ("heun", {}),
    "dpm_2": ("dpm_singlestep", {"order": 2, "variant": "midpoint"}),
}


class _StepDraws:
    """EDM's churn noise as k-diffusion 0.1.1 draws it: one ``randn_like`` at the start of
    every step, used or not, so that a run consumes torch's global generator exactly as
    k-diffusion's does. Asked for the churn of knot ``k``, it makes the draws of the steps
    in between first."""

    def __init__(self, knots: Sequence[Knot]) -> None:
        self.knots = knots
        self.drawn = 0

    def draw(self, x: Tensor, k: int) -> Tensor:
        if k < self.drawn:
            raise RuntimeError(f"the churn noise of knot {k} was drawn already")
        z = torch.randn_like(x)
        self.drawn += 1
        while self.drawn <= k:
            z = torch.randn_like(x)
            self.drawn += 1
        return z

    def __call__(self, x: Tensor, s: Knot, t: Knot) -> Tensor:
        k = next(i for i in range(self.drawn, len(self.knots)) if self.knots[i] is t)
        return self.draw(x, k)


def _edm(
    base: str,
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> Tensor:
    """Karras et al. 2022 (EDM), Alg. 2 with an Euler, Heun or DPM-Solver-2 step: churn
    ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` at the sigmas in ``[s_tmin, s_tmax]``."""
    s_churn = check_non_negative("s_churn", s_churn)
    s_tmin, s_tmax = float(s_tmin), float(s_tmax)
    if math.isnan(s_tmin) or math.isnan(s_tmax):
        raise ValueError(f"s_tmin and s_tmax must not be NaN, got {s_tmin}, {s_tmax}")
    s_noise = check_non_negative("s_noise", s_noise)
    levels = _Levels(sigmas)
    n = levels.steps
    gammas = [
        min(s_churn / n, math.sqrt(2.0) - 1.0) if s_churn > 0 and s_tmin <= v <= s_tmax else 0.0
        for v in levels.floats[:-1]
    ]
    if not any(g > 0 for g in gammas):
        name, options = _EDM_SOLVERS[base]
        solver = get_solver(name, **options)
        return _run(
            model, x, levels, solver, extra_args=extra_args, callback=callback, disable=disable
        )
    if any(b >= a for a, b in itertools.pairwise(levels.floats)):
        raise ValueError("s_churn > 0 needs decreasing sigmas (churn adds noise while sampling)")
    # The knots are the churned levels sigma^_i = (1 + gamma_i) sigma_i, where the network is
    # evaluated; the solver steps from each to the next one's un-churned level and churns.
    hats = [v * (g + 1) for v, g in zip(levels.values[:-1], gammas, strict=True)]
    hat_floats = [float(h) for h in hats] + [levels.floats[-1]]
    schedule = _schedule_for(hat_floats + levels.floats)
    knots = [
        schedule.zero_knot() if v == 0 else schedule.knot_at_lambda(-math.log(v))
        for v in hat_floats
    ]
    if any(a.lam == b.lam for a, b in itertools.pairwise(knots)):
        raise ValueError("s_churn makes two consecutive churned sigmas equal; lower s_churn")
    levels.pin(knots, [*hats, levels.values[-1]])
    solver = get_solver(f"{base}_churn", gamma=(*gammas, 0.0), s_noise=s_noise)
    grid = grid_from_sigmas(schedule, levels.floats)
    plan = Plan(solver, grid, plan_steps(solver, knots, [solver.order] * n))
    draws = _StepDraws(knots)
    # EDM Alg. 2, lines 4-5 for the first step (the solver churns at the end of each step).
    z = draws.draw(x, 0)
    if gammas[0] > 0:
        x = x + z * s_noise * (hats[0] ** 2 - levels.values[0] ** 2) ** 0.5
    result = solve(
        _KDenoiser(model, extra_args, levels),
        x,
        plan,
        noise_sampler=draws,
        callback=_Reporter(callback, x, levels.values, hats),
        progress=_show_progress(disable),
    )
    return result.x


@torch.no_grad()
def sample_euler(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps in k-diffusion's variables: Karras et al. 2022 (EDM), Alg. 2 with Euler
    steps; k-diffusion's ``sample_euler``.

    The Euler step ``x += (sigma_next - sigma) (x - D) / sigma`` is DDIM (the first-order
    DPM-Solver, solver ``ddim``). With ``s_churn > 0`` each step first raises the noise level
    by ``gamma = min(s_churn / N, sqrt(2) - 1)`` (for sigmas in ``[s_tmin, s_tmax]``) with
    fresh noise scaled by ``s_noise`` (solver ``euler_churn``); the churn noise comes from
    torch's global generator, drawn as k-diffusion draws it (one ``randn_like`` per step).
    """
    return _edm(
        "euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise
    )


@torch.no_grad()
def sample_heun(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's method, Karras et al. 2022 (EDM), Alg. 1 (solver ``heun``) and, with
    ``s_churn > 0``, the stochastic sampler of Alg. 2 (solver ``heun_churn``; churn as in
    :func:`sample_euler`). Two evaluations per step; the step to sigma = 0 is Euler."""
    return _edm(
        "heun", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise
    )


@torch.no_grad()
def sample_dpm_2(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1: noise prediction, intermediate point at the
    log-sigma midpoint, solver ``dpm_singlestep`` order 2) inside EDM's Alg. 2: with
    ``s_churn > 0`` the churn of :func:`sample_euler` (solver ``dpm_2_churn``). k-diffusion's
    ``sample_dpm_2``; the step to sigma = 0 is Euler."""
    return _edm(
        "dpm_2", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise
    )


@torch.no_grad()
def sample_ddim(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """ComfyUI's ``ddim`` sampler: DDIM (Song et al. 2021, Eq. 12, deterministic), which in
    k-diffusion's variables is the Euler step, so ComfyUI runs ``sample_euler`` on its sigmas
    (e.g. its ``ddim_uniform`` schedule); so does this (solver ``ddim``)."""
    return _edm(
        "euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise
    )


# --------------------------------------------------------------------------------------
# Ancestral samplers
# --------------------------------------------------------------------------------------


def _ancestral(
    name: str,
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    eta: float,
    s_noise: float,
    noise_sampler: KNoiseSampler | None,
) -> Tensor:
    levels = _Levels(sigmas)
    noise = _noise(noise_sampler, levels, x, brownian=False)
    solver = get_solver(name, eta=eta, s_noise=s_noise)
    return _run(
        model,
        x,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        noise=noise,
    )


@torch.no_grad()
def sample_euler_ancestral(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's ``sample_euler_ancestral``;
    solver ``euler_ancestral``): an Euler (= DDIM) step to ``sigma_down``, then
    ``s_noise * sigma_up`` noise for the interval ``(sigma, sigma_next)``, with
    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``
    (``eta = 1``: DDPM's ancestral step, Ho et al. 2020). Default noise: fresh draws."""
    return _ancestral(
        "euler_ancestral",
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta,
        s_noise,
        noise_sampler,
    )


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (Lu et al. 2022, Alg. 1, noise prediction,
    ``r1 = 1/2``): k-diffusion's ``sample_dpm_2_ancestral`` (solver ``dpm_2_ancestral``).
    Each step goes to ``sigma_down`` with DPM-Solver-2 and adds ``s_noise * sigma_up`` noise,
    as :func:`sample_euler_ancestral`. Default noise: fresh draws.

    Deliberate difference: for ``eta > 1``, where ``sigma_down`` reaches 0 before the last
    step, k-diffusion's function adds no noise in that step (its other ancestral samplers
    do), leaving a clean sample at a noisy level; here the noise is added.
    """
    return _ancestral(
        "dpm_2_ancestral",
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta,
        s_noise,
        noise_sampler,
    )


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, DPM-Solver++ Alg. 1,
    data prediction, ``r = 1/2``): k-diffusion's ``sample_dpmpp_2s_ancestral`` (solver
    ``dpmpp_2s_ancestral``), as :func:`sample_euler_ancestral`. Default noise: fresh draws."""
    return _ancestral(
        "dpmpp_2s_ancestral",
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta,
        s_noise,
        noise_sampler,
    )


@torch.no_grad()
def sample_ddpm(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """ComfyUI's ``ddpm`` sampler: DDPM ancestral sampling (Ho et al. 2020, Eq. 11 with the
    posterior variance), i.e. the exact Gaussian posterior ``q(x_next | x, x0 = D)``. That
    step is SDE-DPM-Solver++(1) with ``eta = 1`` (Lu et al. 2022, DPM-Solver++ App. B;
    solver ``ddpm``). Default noise: fresh draws, as ComfyUI's."""
    levels = _Levels(sigmas)
    noise = _noise(noise_sampler, levels, x, brownian=False)
    return _run(
        model,
        x,
        levels,
        get_solver("ddpm"),
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        noise=noise,
    )


# --------------------------------------------------------------------------------------
# Multistep DPM-Solver++ and its SDE variants
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_dpmpp_2m(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++ Alg. 2, midpoint form; solver
    ``dpmpp_multistep`` order 2): k-diffusion's ``sample_dpmpp_2m``."""
    levels = _Levels(sigmas)
    solver = get_solver("dpmpp_multistep", 2, variant="midpoint")
    return _run(model, x, levels, solver, extra_args=extra_args, callback=callback, disable=disable)


@torch.no_grad()
def sample_dpmpp_3m(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
) -> Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022, DPM-Solver++ App. B), ours (not in k-diffusion):
    the multistep update with the full
    second-derivative term of the exponential-integrator expansion, which makes it third
    order (solver ``dpmpp_multistep`` order 3, :mod:`dpmsolver.solvers.multistep`). The
    published update, k-diffusion's 3M, is :func:`sample_dpmpp_3m_sde` with ``eta=0``."""
    levels = _Levels(sigmas)
    solver = get_solver("dpmpp_multistep", 3)
    return _run(model, x, levels, solver, extra_args=extra_args, callback=callback, disable=disable)


@torch.no_grad()
def sample_dpmv3(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    ems: Any = None,
    order: int = 2,
    corrector: str = "auto",
    pseudo_order: bool = False,
    half_corrector: bool = False,
) -> Tensor:
    """DPM-Solver-v3 (Zheng et al. 2023, Sec. 3; solver ``dpmv3``), ours (not in
    k-diffusion), with the model's empirical statistics ``ems``
    (:class:`dpmsolver.ems.EMS` or a path to one; None: DPM-Solver++ with v3's corrector).
    The statistics live in half log-SNR and ``x / alpha``, so those computed on the model's
    own schedule apply unchanged in k-diffusion's variables; their grid must cover the
    sigmas. ``order``, ``corrector``, ``pseudo_order``, ``half_corrector``: as
    :class:`dpmsolver.solvers.v3.DPMSolverV3`."""
    from ..ems import EMS

    stats = EMS.load(ems) if isinstance(ems, (str, os.PathLike)) else ems
    if stats is not None and not isinstance(stats, EMS):
        raise TypeError(
            f"ems must be a dpmsolver.ems.EMS, a path to one, or None; got {type(ems).__name__}"
        )
    levels = _Levels(sigmas)
    solver = get_solver(
        "dpmv3",
        order,
        ems=None if stats is None else stats.in_any_schedule(),
        corrector=corrector,
        pseudo_order=pseudo_order,
        half_corrector=half_corrector,
    )
    return _run(model, x, levels, solver, extra_args=extra_args, callback=callback, disable=disable)


def _multistep_sde(
    order: int,
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    eta: float,
    s_noise: float,
    noise_sampler: KNoiseSampler | None,
    solver_type: str,
) -> Tensor:
    variant = check_choice("solver_type", solver_type, ("midpoint", "heun"))
    levels = _Levels(sigmas)
    noise = _noise(noise_sampler, levels, x, brownian=True)
    options: dict[str, Any] = {"variant": variant, "eta": eta, "s_noise": s_noise}
    if order == 3:
        options["third_order"] = "legacy"
    solver = get_solver("dpmpp_multistep_sde", order, **options)
    return _run(
        model,
        x,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        noise=noise,
    )


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
    solver_type: str = "midpoint",
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, DPM-Solver++ App. B, with k-diffusion's
    ``eta``: 0 is the ODE solver DPM-Solver++(2M), 1 the reverse SDE): k-diffusion's
    ``sample_dpmpp_2m_sde`` (solver ``dpmpp_multistep_sde`` order 2). ``solver_type`` is the
    second-order form, ``"midpoint"`` or ``"heun"``; ``s_noise`` scales the injected noise.
    Default noise: a Brownian tree over the sigmas' range seeded from torch's global
    generator (k-diffusion's ``BrownianTreeNoiseSampler``; fresh draws without torchsde)."""
    return _multistep_sde(
        2,
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta,
        s_noise,
        noise_sampler,
        solver_type,
    )


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(3M) (Lu et al. 2022, DPM-Solver++ App. B, with the third-order
    multistep update): k-diffusion's ``sample_dpmpp_3m_sde`` (solver
    ``dpmpp_multistep_sde`` order 3 with ``third_order="legacy"`` and the ``"heun"``
    second-order warm-up step, as k-diffusion's). ``eta = 0`` is k-diffusion's ODE 3M.
    Default noise as :func:`sample_dpmpp_2m_sde`.

    Deliberate difference available: the published third-order update (DPM-Solver++ and
    k-diffusion) multiplies ``phi_3`` by half the second-derivative term and is second
    order; ours, ``dp.get_solver("dpmpp_multistep_sde", 3)`` (``third_order="taylor"``; for
    ``eta = 0`` :func:`sample_dpmpp_3m`), uses the whole term and is third order.
    """
    return _multistep_sde(
        3, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, "heun"
    )


@torch.no_grad()
def sample_dpmpp_2m_sde_gpu(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
    solver_type: str = "midpoint",
) -> Tensor:
    """ComfyUI's ``dpmpp_2m_sde_gpu``: SDE-DPM-Solver++(2M) (Lu et al. 2022),
    :func:`sample_dpmpp_2m_sde` with its default Brownian tree on ``x``'s device (ComfyUI's
    non-``_gpu`` version builds it on the CPU). Here the default tree always lives on
    ``x``'s device, so the two names are the same sampler."""
    return _multistep_sde(
        2,
        model,
        x,
        sigmas,
        extra_args,
        callback,
        disable,
        eta,
        s_noise,
        noise_sampler,
        solver_type,
    )


@torch.no_grad()
def sample_dpmpp_3m_sde_gpu(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """ComfyUI's ``dpmpp_3m_sde_gpu``: SDE-DPM-Solver++(3M) (Lu et al. 2022),
    :func:`sample_dpmpp_3m_sde` (the published 3M SDE update) with the default Brownian tree
    on ``x``'s device, as :func:`sample_dpmpp_2m_sde_gpu`."""
    return _multistep_sde(
        3, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, "heun"
    )


# --------------------------------------------------------------------------------------
# Singlestep DPM-Solver++ SDE
# --------------------------------------------------------------------------------------


def _dpmpp_sde(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    eta: float,
    s_noise: float,
    noise_sampler: KNoiseSampler | None,
    r: float,
) -> Tensor:
    if not 0.0 < check_finite_float("r", r) < 1.0:
        raise ValueError(f"r must lie in (0, 1), got {r}")
    levels = _Levels(sigmas)
    noise = _noise(noise_sampler, levels, x, brownian=True)
    solver = get_solver("dpmpp_sde", eta=eta, s_noise=s_noise, r1=r)
    return _run(
        model,
        x,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        noise=noise,
    )


@torch.no_grad()
def sample_dpmpp_sde(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
    r: float = 1 / 2,
) -> Tensor:
    """DPM-Solver++ (stochastic), k-diffusion's ``sample_dpmpp_sde`` (solver ``dpmpp_sde``,
    :mod:`dpmsolver.solvers.dpmpp_sde`): DPM-Solver++(2S) (Lu et al. 2022, DPM-Solver++
    Alg. 1; intermediate point at ``r`` of the step in log-sigma) built from two ancestral
    sub-steps, whose noise is drawn for the intervals ``(sigma, sigma_mid)`` and
    ``(sigma, sigma_next)``. Default noise as :func:`sample_dpmpp_2m_sde` (a Brownian tree).

    Deliberate difference available: our SDE-DPM-Solver++(2S) integrates the SDE with the
    exponential integrator and splits the step's Brownian increment at the intermediate
    point, so both evaluations lie on one sample path (solver ``dpmpp_2s_sde``:
    ``dp.sample(..., solver="dpmpp_2s_sde")`` or ``dp.get_solver("dpmpp_2s_sde", eta=...)``).
    """
    return _dpmpp_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r
    )


@torch.no_grad()
def sample_dpmpp_sde_gpu(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
    r: float = 1 / 2,
) -> Tensor:
    """ComfyUI's ``dpmpp_sde_gpu``: DPM-Solver++ (stochastic; Lu et al. 2022),
    :func:`sample_dpmpp_sde` with the default Brownian tree
    on ``x``'s device, as :func:`sample_dpmpp_2m_sde_gpu`."""
    return _dpmpp_sde(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, r
    )


# --------------------------------------------------------------------------------------
# Linear multistep in sigma~: LMS, iPNDM, DEIS; UniPC
# --------------------------------------------------------------------------------------


@torch.no_grad()
def sample_lms(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Karras et al. 2022, EDM Sec. 3, after Adams-Bashforth): the
    Adams-Bashforth method on ``d = (x - D) / sigma`` in sigma with weights for the actual
    steps (k-diffusion's ``sample_lms``; solver ``lms``), warm-up
    ``min(i + 1, order)``. As k-diffusion's, the last step integrates its polynomial down to
    sigma = 0 (k-diffusion takes the weights from ``scipy.integrate.quad``; here the
    polynomial is integrated exactly)."""
    levels = _Levels(sigmas)
    solver = get_solver("lms", order)
    return _run(model, x, levels, solver, extra_args=extra_args, callback=callback, disable=disable)


def _ipndm(
    coefficients: str,
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    max_order: int,
) -> Tensor:
    max_order = check_choice("max_order", max_order, (1, 2, 3, 4))
    levels = _Levels(sigmas)
    solver = get_solver("ipndm", max_order, coefficients=coefficients)
    return _run(
        model,
        x,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        final_first_order=True,
    )


@torch.no_grad()
def sample_ipndm(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    max_order: int = 4,
) -> Tensor:
    """ComfyUI's ``ipndm``: improved PNDM (Zhang & Chen 2022, DEIS paper, Sec. 5): the
    classical Adams-Bashforth weights (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24,
    37/24, -9/24) on ``d = (x - D) / sigma`` in sigma, lower-order warm-up, ``x = D`` into
    sigma = 0 (solver ``ipndm`` with ``coefficients="fixed"``). The fixed weights assume
    steps equal in sigma; on other grids the method is second order
    (:mod:`dpmsolver.solvers.linear_multistep`)."""
    return _ipndm("fixed", model, x, sigmas, extra_args, callback, disable, max_order)


@torch.no_grad()
def sample_ipndm_v(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    max_order: int = 4,
) -> Tensor:
    """ComfyUI's ``ipndm_v``: iPNDM (Zhang & Chen 2022) with variable-step weights, those of
    its source (zju-pi/diff-sampler; solver ``ipndm`` with ``coefficients="diff_sampler"``).
    Their order-2 weights are the exact variable-step ones; the order-3 and order-4 ones are
    exact only for equal steps (measured third order for ``max_order=4``).

    Deliberate difference available: Adams-Bashforth weights integrated exactly for the
    actual steps, fourth order (``dp.get_solver("ipndm", 4)``, ``coefficients="variable"``;
    :func:`sample_lms` is that update, integrating into sigma = 0).
    """
    return _ipndm("diff_sampler", model, x, sigmas, extra_args, callback, disable, max_order)


class _DEISClock(NoiseSchedule):
    """k-diffusion's sigmas (``alpha = 1``) on the clock ComfyUI's ``deis_mode="tab"``
    interpolates in: the time ``t`` of the linear VP-SDE ``sigma~(t)^2 = exp(beta_d t^2 / 2 +
    beta_min t) - 1`` fitted to EDM's range, ``sigma~(1e-3) = 0.002`` and ``sigma~(1) = 80``
    (zju-pi/diff-sampler's ``edm2t``). The fit has ``beta_min < 0``, so ``t(0) > 0``."""

    EPS, SIGMA_MIN, SIGMA_MAX = 1e-3, 0.002, 80.0

    def __init__(self, sigma_lo: float, sigma_hi: float) -> None:
        log_min = math.log1p(self.SIGMA_MIN**2)
        log_max = math.log1p(self.SIGMA_MAX**2)
        self.beta_d = 2.0 * (log_min / self.EPS - log_max) / (self.EPS - 1.0)
        self.beta_min = log_max - 0.5 * self.beta_d
        self.t_min = float(self.t_of_lambda(torch.tensor(-math.log(sigma_lo))))
        self.t_max = float(self.t_of_lambda(torch.tensor(-math.log(sigma_hi))))

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(torch.as_tensor(t, dtype=torch.float64))

    def log_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return 0.5 * torch.log(torch.expm1(0.5 * self.beta_d * t**2 + self.beta_min * t))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        # log(1 + sigma~^2) = softplus(-2 lambda); the root of the quadratic in t.
        log1p_s2 = torch.nn.functional.softplus(-2.0 * torch.as_tensor(lam, dtype=torch.float64))
        disc = self.beta_min**2 + 2.0 * self.beta_d * log1p_s2
        return (torch.sqrt(disc) - self.beta_min) / self.beta_d


@torch.no_grad()
def sample_deis(
    model: KModel,
    x: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    max_order: int = 3,
    deis_mode: str = "tab",
) -> Tensor:
    """ComfyUI's ``deis``: DEIS (Zhang & Chen 2022), the exponential integrator with the
    noise prediction replaced by the polynomial through its last ``max_order`` values
    (solver ``deis``). In k-diffusion's variables ``x~ += sum_j C_j eps_j`` with
    ``C_j = Int l_j dsigma~`` over the step:

    - ``deis_mode="tab"`` (t-AB): ``l_j`` the Lagrange basis in the time of the linear VP-SDE
      that ComfyUI fits to EDM's range (0.002 at t = 1e-3, 80 at t = 1), whatever the
      model; solver ``deis`` with ``mode="tab"`` on that clock (``_DEISClock``).
    - ``deis_mode="rhoab"`` (rho-AB): ``l_j`` in sigma itself, i.e. Adams-Bashforth weights
      for the actual steps (solver ``deis`` with ``mode="rhoab"``).

    Warm-up ``min(i + 1, max_order)``; ``x = D`` into sigma = 0.

    Differences from ComfyUI's code: it integrates the t-AB weights by a 10 000-point
    rectangle rule (relative error ~1e-5 in a weight, ~7e-6 in a 10-step sample); here they
    are integrated to machine precision (Gauss-Legendre in sigma). Its ``rhoab`` table is
    built with one node more than the step uses from step ``max_order + 1`` on (order
    ``min(i, max_order)`` where the sampler uses ``min(i + 1, max_order)``), which raises for
    ``max_order <= 3`` and reuses stale weights for ``max_order = 4``; here every step has
    the weights of the order it uses, which is what its first ``max_order`` steps compute.
    """
    max_order = check_choice("max_order", max_order, (1, 2, 3, 4))
    mode = check_choice("deis_mode", deis_mode, ("tab", "rhoab"))
    levels = _Levels(sigmas)
    positive = [v for v in levels.floats if v > 0]
    if not positive:
        raise ValueError("sigmas must contain a positive value")
    schedule: NoiseSchedule = (
        _DEISClock(min(positive), max(positive)) if mode == "tab" else _schedule_for(positive)
    )
    solver = get_solver("deis", max_order, mode=mode)
    return _run(
        model,
        x,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        schedule=schedule,
    )


def _uni_pc(
    variant: str,
    model: KModel,
    noise: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
) -> Tensor:
    variant = check_choice("variant", variant, ("bh1", "bh2"))
    levels = _Levels(sigmas)
    if levels.floats[-1] == 0.0:
        # ComfyUI ends UniPC at sigma = 0.001 instead of 0 (its last step is UniP-1, i.e.
        # DDIM, to 0.001) and returns that state.
        if len(levels.floats) > 2 and levels.floats[-2] <= 0.001:
            raise ValueError(
                "sigmas: ComfyUI's UniPC replaces the final 0 by 0.001, which must lie below "
                f"the last positive sigma, got {levels.floats[-2]}"
            )
        end = torch.tensor(0.001, dtype=levels.tensor.dtype, device=levels.tensor.device)
        levels = _Levels(torch.cat([levels.tensor[:-1], end[None]]))
    order = max(1, min(3, levels.steps - 1))
    solver = get_solver("unipc", order, variant=variant)
    return _run(
        model,
        noise,
        levels,
        solver,
        extra_args=extra_args,
        callback=callback,
        disable=disable,
        lower_order_final=True,
    )


@torch.no_grad()
def sample_uni_pc(
    model: KModel,
    noise: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = False,
    variant: str = "bh1",
) -> Tensor:
    """ComfyUI's ``uni_pc``: UniPC (Zhao et al. 2023, UniP-p with the corrector UniC-p,
    data prediction) of order ``min(3, steps - 1)`` with lower-order warm-up and final
    steps, ``B(h) = h`` (``variant="bh1"``) or ``expm1(h)`` (``"bh2"``); solver ``unipc``.
    ``noise`` is the starting state (ComfyUI's name for ``x``). As ComfyUI's, a trailing
    sigma = 0 is replaced by 0.001 and the state there returned.

    Difference: with a single step ComfyUI's loop makes no update (order 0) and returns the
    starting state; here one first-order step is taken.
    """
    return _uni_pc(variant, model, noise, sigmas, extra_args, callback, disable)


@torch.no_grad()
def sample_uni_pc_bh2(
    model: KModel,
    noise: Tensor,
    sigmas: Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = False,
) -> Tensor:
    """ComfyUI's ``uni_pc_bh2``: :func:`sample_uni_pc` with ``B(h) = expm1(h)`` (UniPC's
    bh2, Zhao et al. 2023)."""
    return _uni_pc("bh2", model, noise, sigmas, extra_args, callback, disable)


# --------------------------------------------------------------------------------------
# k-diffusion's DPM-Solver driver: DPM-Solver-fast and DPM-Solver-12/23 with a PID controller
# --------------------------------------------------------------------------------------


class _Evaluations:
    """The denoiser with a call count and a progress tick per call (k-diffusion's
    ``eps_callback``)."""

    def __init__(self, denoiser: _KDenoiser, bar: Progress) -> None:
        self.denoiser = denoiser
        self.bar = bar
        self.count = 0

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        self.count += 1
        self.bar.update()
        return self.denoiser(x, knot)


def _clamped_ancestral(
    schedule: NoiseSchedule, s: Knot, t: Knot, eta: float, lam_end: float
) -> tuple[Knot, float]:
    """k-diffusion's ancestral split for its DPM-Solver driver: ``sigma_down`` no lower than
    the end of the run, and ``sigma_up`` recomputed from it."""
    s_from, s_to = s.ksigma, t.ksigma
    up = min(s_to, eta * math.sqrt(max(s_to**2 * (s_from**2 - s_to**2) / s_from**2, 0.0)))
    down = math.sqrt(max(s_to**2 - up**2, 0.0))
    lam_down = min(lam_end, -math.log(down)) if down > 0 else lam_end
    end = schedule.knot_at_lambda(lam_down)
    return end, math.sqrt(max(s_to**2 - end.ksigma**2, 0.0))


def _scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


@torch.no_grad()
def sample_dpm_fast(
    model: KModel,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, DPM-Solver Sec. 3.4 and App. D.2): ``n`` network
    evaluations spent by singlestep noise-prediction steps of orders 3, ..., 3 then 2 / 1 on
    a grid uniform in log sigma from ``sigma_max`` to ``sigma_min`` (solver ``dpm_fast``);
    k-diffusion's ``sample_dpm_fast``.

    With ``eta > 0`` each step is ancestral as k-diffusion's: it goes to ``sigma_down``
    (never below ``sigma_min``) and adds ``s_noise * sigma_up`` noise for the interval
    ``(sigma, sigma_next)``; default noise: fresh draws. k-diffusion drives these steps
    itself (its ``DPMSolver`` class); so does this function, with the solver's steps.
    """
    schedule = _range_schedule(sigma_min, sigma_max)
    nfe = check_int("n", n, minimum=1)
    eta, s_noise = check_non_negative("eta", eta), check_non_negative("s_noise", s_noise)
    solver = get_solver("dpm_fast", 3)
    orders = solver.plan(steps=None, nfe=nfe, final_zero=False, lower_order_final=False)
    grid = make_grid(schedule, len(orders), "logsnr", final="t_min")
    levels = _Levels(torch.tensor(grid.ksigmas, dtype=torch.float64))
    noise = _noise(noise_sampler, levels, x, brownian=False) if eta > 0 else None
    lam_end = grid.knots[-1].lam
    with Progress(nfe, enabled=_show_progress(disable)) as bar:
        evaluate = _Evaluations(_KDenoiser(model, extra_args), bar)
        for i, (s, t) in enumerate(itertools.pairwise(grid.knots)):
            end, up = (t, 0.0)
            if noise is not None:
                end, up = _clamped_ancestral(schedule, s, t, eta, lam_end)
            x0 = evaluate(x, s)
            if callback is not None:
                lam = _scalar(s.lam)
                sigma = _scalar(s.ksigma)
                callback(
                    {"x": x, "i": i, "t": lam, "t_up": lam, "denoised": x0}
                    | {"sigma": sigma, "sigma_hat": sigma}
                )
            ctx = StepContext(i, s, end, orders[i], evaluate, schedule)
            x, _ = solver.step(ctx, x, x0, None)
            if noise is not None:
                x = x + noise(x, s, t) * (up * s_noise)
    return x


class _PIDController:
    """k-diffusion's step-size controller for DPM-Solver-12/23: a PID filter on the inverse
    error (Söderlind 2003) with an ``atan`` limiter; a step is accepted when the limited
    factor is at least ``accept_safety``, and the step size is multiplied by it either way."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float,
        accept_safety: float,
        eps: float = 1e-8,
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inv_errors: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1.0 / (error + self.eps)
        if not self.inv_errors:
            self.inv_errors = [inv, inv, inv]
        self.inv_errors[0] = inv
        e0, e1, e2 = self.inv_errors
        factor = e0**self.b1 * e1**self.b2 * e2**self.b3
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.inv_errors[2], self.inv_errors[1] = e1, e0
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    model: KModel,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler: KNoiseSampler | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, int]]:
    """DPM-Solver-12 / DPM-Solver-23 with adaptive steps (Lu et al. 2022, DPM-Solver
    Sec. 4.2): each attempt is the registered ``dpm_adaptive`` solver's pair of singlestep
    solutions of orders ``order`` and ``order - 1`` (noise prediction), scored by
    ``||(x_low - x_high) / max(atol, rtol max(|x_low|, |x_prev|))||_2 / sqrt(numel)`` over the
    whole batch. k-diffusion's ``sample_dpm_adaptive`` controls the step with a PID filter
    (``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``) instead of the paper's rule, and
    so does this function; as k-diffusion's, a rejected attempt re-evaluates its start (so
    the call count is k-diffusion's), the run stops within 1e-5 of ``-log sigma_min``, and
    ``eta > 0`` makes accepted steps ancestral (to ``sigma_down`` no lower than
    ``sigma_min``, then ``s_noise * sigma_up`` noise; default noise: fresh draws).

    Ours with DPM-Solver's own controller (Alg. 4): ``dp.solve`` with
    ``dp.get_solver("dpm_adaptive")``. ``return_info`` also returns
    ``{"steps", "nfe", "n_accept", "n_reject"}``.
    """
    schedule = _range_schedule(sigma_min, sigma_max)
    order = check_choice("order", order, (2, 3))
    eta, s_noise = check_non_negative("eta", eta), check_non_negative("s_noise", s_noise)
    solver = get_solver("dpm_adaptive", order, rtol=rtol, atol=atol, h_init=abs(h_init))
    assert isinstance(solver, AdaptiveSolver)
    pid = _PIDController(
        solver.h_init,
        check_finite_float("pcoeff", pcoeff),
        check_finite_float("icoeff", icoeff),
        check_finite_float("dcoeff", dcoeff),
        1.5 if eta else order,
        check_finite_float("accept_safety", accept_safety),
    )
    start, finish = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    levels = _Levels(torch.tensor([schedule.t_max, schedule.t_min], dtype=torch.float64))
    noise = _noise(noise_sampler, levels, x, brownian=False) if eta > 0 else None
    atol_t, rtol_t = torch.tensor(float(atol)), torch.tensor(float(rtol))
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, x_prev = start, x
    with Progress(None, enabled=_show_progress(disable)) as bar:
        evaluate = _Evaluations(_KDenoiser(model, extra_args), bar)
        while s.lam < finish.lam - 1e-5:
            lam_t = min(finish.lam, s.lam + pid.h)
            t = finish if lam_t == finish.lam else schedule.knot_at_lambda(lam_t)
            end, up = (t, 0.0)
            if noise is not None:
                end, up = _clamped_ancestral(schedule, s, t, eta, finish.lam)
            x0 = evaluate(x, s)
            ctx = StepContext(info["steps"], s, end, order, evaluate, schedule)
            x_high, x_low = solver.attempt(ctx, x, x0)
            delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose(float(error)):
                x_prev = x_low
                x = x_high
                if noise is not None:
                    x = x + noise(x, s, t) * (up * s_noise)
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if not pid.h >= 1e-10:  # NaN too
                raise RuntimeError(
                    f"adaptive step size collapsed at sigma={s.ksigma:.6g} (error {float(error)}); "
                    "loosen rtol/atol"
                )
            if callback is not None:
                lam, sigma = _scalar(s.lam), _scalar(s.ksigma)
                callback(
                    {"x": x, "i": info["steps"] - 1, "t": lam, "t_up": lam, "denoised": x0}
                    | {"error": error, "h": pid.h, **info, "sigma": sigma, "sigma_hat": sigma}
                )
    if return_info:
        return x, info
    return x


# --------------------------------------------------------------------------------------
# Sigma grids (k-diffusion's signatures; descending, with a trailing 0)
# --------------------------------------------------------------------------------------


def _with_zero(values: list[float], device: torch.device | str) -> Tensor:
    return torch.tensor([*values, 0.0], dtype=torch.get_default_dtype(), device=device)


def _spaced(
    schedule: NoiseSchedule, n: int, kind: GridKind, rho: float | None = None, **ends: float
) -> list[float]:
    n = check_int("n", n, minimum=1)
    if n == 1:
        return [schedule.knot(ends.get("t_start", schedule.t_max)).ksigma]
    return make_grid(schedule, n - 1, kind, final="t_min", rho=rho, **ends).ksigmas


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str = "cpu"
) -> Tensor:
    """Karras et al. 2022 (EDM), Eq. 5: ``n`` sigmas uniform in ``sigma^(1/rho)``, then 0."""
    return _with_zero(_spaced(_range_schedule(sigma_min, sigma_max), n, "karras", rho), device)


def get_sigmas_exponential(
    n: int, sigma_min: float, sigma_max: float, device: torch.device | str = "cpu"
) -> Tensor:
    """``n`` sigmas uniform in log sigma, then 0."""
    return _with_zero(_spaced(_range_schedule(sigma_min, sigma_max), n, "exponential"), device)


def get_sigmas_logsnr(
    n: int, sigma_min: float, sigma_max: float, device: torch.device | str = "cpu"
) -> Tensor:
    """``n`` sigmas uniform in half log-SNR (DPM-Solver, Sec. 3.3), then 0. k-diffusion's
    sigma is ``exp(-lambda)`` on every schedule, so this is the exponential grid."""
    return _with_zero(_spaced(_range_schedule(sigma_min, sigma_max), n, "logsnr"), device)


def get_sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0, device: torch.device | str = "cpu"
) -> Tensor:
    """``n`` sigmas with log sigma a ``rho``-th power ramp (``rho = 1``: exponential), then 0."""
    return _with_zero(
        _spaced(_range_schedule(sigma_min, sigma_max), n, "polyexponential", rho), device
    )


def get_sigmas_vp(
    n: int,
    beta_d: float = 19.9,
    beta_min: float = 0.1,
    eps_s: float = 1e-3,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The continuous VP-SDE schedule (Song et al. 2021; ``beta_max = beta_min + beta_d``)
    at ``n`` times uniform in ``[eps_s, 1]``, then 0."""
    beta_d = check_finite_float("beta_d", beta_d, positive=True)
    sched = ContinuousVPSchedule(
        "linear", beta_min=beta_min, beta_max=beta_min + beta_d, t_min=eps_s, t_max=1.0
    )
    return _with_zero(_spaced(sched, n, "time_uniform", t_start=1.0, t_end=eps_s), device)


def get_sigmas_schedule(
    schedule: NoiseSchedule,
    n: int,
    grid: GridKind = "logsnr",
    *,
    rho: float | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``n`` k-diffusion sigmas of any dpmsolver ``schedule`` spaced by ``grid`` over its
    whole range (e.g. ``"time_uniform"`` on a :class:`DiscreteVPSchedule` is k-diffusion's
    ``DiscreteSchedule.get_sigmas``), then 0."""
    check_choice(
        "grid",
        grid,
        ("logsnr", "exponential", "time_uniform", "time_quadratic", "karras", "polyexponential"),
    )
    return _with_zero(_spaced(schedule, n, grid, rho), device)


# --------------------------------------------------------------------------------------
# Discrete DDPM networks as k-diffusion denoisers
# --------------------------------------------------------------------------------------


class DiscreteDDPMDenoiser(torch.nn.Module):
    """A discrete-time DDPM network (``model(x, t, **kwargs)``, ``t`` the training timestep)
    as a k-diffusion denoiser ``D(x~, sigma~) -> x0`` (k-diffusion's ``external.py``).

    The network sees ``x = alpha x~`` (``c_in = 1 / sqrt(1 + sigma~^2)``) at the timestep
    with that noise level on the :class:`~dpmsolver.schedules.DiscreteVPSchedule`
    (log sigma~ interpolated linearly between timesteps; rounded to an integer with
    ``quantize``), and its output becomes x0 through
    :func:`dpmsolver.parameterization.data_coefficients`.

    Args:
        model: the network.
        alphas_cumprod: its training ``alphas_cumprod``.
        prediction: what it outputs (``"eps"``, ``"v"``, ``"x0"``, ...; default ``"eps"``).
        quantize: round the timestep to an integer (default False).
    """

    def __init__(
        self,
        model: KModel,
        alphas_cumprod: Tensor,
        prediction: Prediction = "eps",
        quantize: bool = False,
    ) -> None:
        super().__init__()
        self.inner_model = model
        self.prediction: Prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.quantize = bool(quantize)
        self.schedule = DiscreteVPSchedule(alphas_cumprod=torch.as_tensor(alphas_cumprod))

    @property
    def sigmas(self) -> Tensor:
        """The training noise levels (k-diffusion sigmas) by timestep, float64."""
        return self.t_to_sigma(torch.arange(self.schedule.num_train_timesteps))

    @property
    def sigma_min(self) -> float:
        """The least noisy training level (k-diffusion sigma)."""
        return float(self.schedule.knot(self.schedule.t_min).ksigma)

    @property
    def sigma_max(self) -> float:
        """The noisiest training level (k-diffusion sigma)."""
        return float(self.schedule.knot(self.schedule.t_max).ksigma)

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        """Training timestep(s) with noise level ``sigma`` (float64)."""
        t = self.schedule.t_of_lambda(-torch.log(torch.as_tensor(sigma, dtype=torch.float64).cpu()))
        return t.round() if (self.quantize if quantize is None else quantize) else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Noise level(s) at training timestep(s) ``t`` (float64)."""
        return torch.exp(-self.schedule.lambda_(torch.as_tensor(t, dtype=torch.float64).cpu()))

    def get_sigmas(self, n: int | None = None) -> Tensor:
        """``n`` sigmas at timesteps uniform over the training range, then 0 (all training
        levels, descending, if ``n`` is None)."""
        if n is None:
            return _with_zero(self.sigmas.flip(0).tolist(), "cpu")
        return get_sigmas_schedule(self.schedule, n, "time_uniform")

    def forward(self, input: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        """``x0`` for the noisy ``input`` (k-diffusion variables) at per-sample ``sigma``."""
        ks = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(input.shape[0])
        alpha = 1.0 / torch.sqrt(1.0 + ks * ks)
        shape = (-1,) + (1,) * (input.ndim - 1)
        a = alpha.to(device=input.device, dtype=input.dtype).view(shape)
        s = (ks * alpha).to(device=input.device, dtype=input.dtype).view(shape)
        x = input * a
        t = self.sigma_to_t(ks).to(device=input.device, dtype=input.dtype)
        out = self.inner_model(x, t, **kwargs)
        # data_coefficients is affine arithmetic: it broadcasts over per-sample tensors.
        cx, co = data_coefficients(self.prediction, cast(float, a), cast(float, s))
        return x * cx + out * co


class DiscreteEpsDDPMDenoiser(DiscreteDDPMDenoiser):
    """k-diffusion's ``DiscreteEpsDDPMDenoiser``: a discrete eps-prediction network."""

    def __init__(self, model: KModel, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        super().__init__(model, alphas_cumprod, "eps", quantize)


class DiscreteVDDPMDenoiser(DiscreteDDPMDenoiser):
    """k-diffusion's ``DiscreteVDDPMDenoiser``: a discrete v-prediction network."""

    def __init__(self, model: KModel, alphas_cumprod: Tensor, quantize: bool = False) -> None:
        super().__init__(model, alphas_cumprod, "v", quantize)
