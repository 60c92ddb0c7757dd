"""k-diffusion / ComfyUI-style sampler functions over dpmsolver's solvers.

``sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None)`` and its
siblings take a denoiser ``model(x, sigma, **extra_args) -> x0`` in k-diffusion's variables
(``x~ = x / alpha``, ``sigma~ = sigma / alpha``; Karras et al. 2022, Sec. 2), which makes
every problem a variance-exploding one: the functions resolve ``sigmas`` on a
:class:`~dpmsolver.schedules.VESchedule` (:func:`~dpmsolver.timegrid.grid_from_sigmas`) and
run :func:`dpmsolver.solve`. Decreasing sigmas sample (a trailing 0 ends with
``x = denoised``); increasing sigmas invert.

The functions are generated from one table, :data:`SAMPLERS`: name -> (registry name, fixed
options, k-diffusion keyword arguments and where each goes). An entry is exported only when
its solver is registered and accepts the options the entry routes to it; the others are
listed in :data:`UNAVAILABLE` with the reason, and appear by themselves once a solver of
that name is registered. Facts used: k-diffusion's Euler step in (sigma~, x~) *is* DDIM, the
first-order DPM-Solver; its ``sample_dpm_2`` is the noise-prediction DPM-Solver-2 with
``r1 = 1/2`` (midpoint form); its ``sample_dpmpp_2m`` is DPM-Solver++(2M), midpoint form.

Also here: sigma grids with k-diffusion's signatures, built on :func:`dpmsolver.make_grid`,
and wrappers that turn discrete-time eps / v DDPM networks into such denoisers.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch
from torch import Tensor

from .._validate import check_choice, check_finite_float, check_int
from ..loop import StepInfo, solve
from ..noise import SigmaNoise
from ..parameterization import PREDICTIONS, Prediction, data_coefficients
from ..plan import solver_orders
from ..schedules import ContinuousVPSchedule, DiscreteVPSchedule, Knot, NoiseSchedule, VESchedule
from ..solvers import ALIASES, REGISTRY, AdaptiveSolver, Solver, get_solver
from ..timegrid import GridKind, TimeGrid, grid_from_sigmas, make_grid

__all__ = [
    "SAMPLERS",
    "UNAVAILABLE",
    "DiscreteDDPMDenoiser",
    "DiscreteEpsDDPMDenoiser",
    "DiscreteVDDPMDenoiser",
    "KSampler",
    "Route",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_logsnr",
    "get_sigmas_polyexponential",
    "get_sigmas_schedule",
    "get_sigmas_vp",
]

KModel = Callable[..., Tensor]
KCallback = Callable[[dict[str, Any]], Any]


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where a k-diffusion keyword argument goes.

    ``kind``: ``"order"`` (the solver's order), ``"option"`` (solver option ``target``),
    ``"noise"`` (the noise sampler of stochastic solvers), ``"only"`` (a feature we do not
    offer: only ``value`` is accepted, ``why`` says so), ``"inert"`` (accepted, no effect
    here, e.g. ``s_noise`` when ``s_churn = 0``), ``"info"`` (``return_info``).
    """

    kind: Literal["order", "option", "noise", "only", "inert", "info"]
    target: str = ""
    value: Any = None
    why: str = ""


@dataclass(frozen=True)
class KSampler:
    """One k-diffusion / ComfyUI sampler name.

    Attributes:
        solver: registry name or alias.
        fixed: solver options (``order`` included) the name fixes.
        params: k-diffusion keyword -> (default, :class:`Route`).
        interface: ``"sigmas"`` (``model, x, sigmas``), ``"fast"`` (``model, x, sigma_min,
            sigma_max, n``) or ``"adaptive"`` (``model, x, sigma_min, sigma_max``).
        note: how the name relates to the solver.
    """

    solver: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    params: Mapping[str, tuple[Any, Route]] = field(default_factory=dict)
    interface: Literal["sigmas", "fast", "adaptive"] = "sigmas"
    note: str = ""


_NO_CHURN = Route("only", value=0.0, why="stochastic churn (EDM Alg. 2) needs an SDE solver")
_CHURN = {
    "s_churn": (0.0, _NO_CHURN),
    "s_tmin": (0.0, Route("inert")),
    "s_tmax": (math.inf, Route("inert")),
    "s_noise": (1.0, Route("inert")),
}
_ANCESTRAL = {
    "eta": (1.0, Route("option", "eta")),
    "s_noise": (1.0, Route("option", "s_noise")),
    "noise_sampler": (None, Route("noise")),
}
_DETERMINISTIC_ONLY = Route("only", value=0.0, why="this solver is deterministic (eta must be 0)")

SAMPLERS: dict[str, KSampler] = {
    "sample_euler": KSampler(
        "ddim",
        {},
        _CHURN,
        note="Euler in (sigma~, x~) is DDIM = first-order DPM-Solver (EDM Alg. 2, s_churn = 0)",
    ),
    "sample_euler_ancestral": KSampler("euler_ancestral", {}, _ANCESTRAL),
    "sample_heun": KSampler("heun", {}, _CHURN, note="EDM Alg. 1/2"),
    "sample_dpm_2": KSampler(
        "dpm_singlestep",
        {"order": 2, "variant": "midpoint"},
        _CHURN,
        note="DPM-Solver-2 (noise prediction, r1 = 1/2, DPM-Solver Alg. 1)",
    ),
    "sample_dpm_2_ancestral": KSampler("dpm_2_ancestral", {}, _ANCESTRAL),
    "sample_lms": KSampler("lms", {}, {"order": (4, Route("order"))}),
    "sample_dpm_fast": KSampler(
        "dpm_fast",
        {"order": 3},
        {
            "eta": (0.0, _DETERMINISTIC_ONLY),
            "s_noise": (1.0, Route("inert")),
            "noise_sampler": (None, Route("inert")),
        },
        interface="fast",
        note="DPM-Solver-fast (DPM-Solver Sec. 3.4): n evaluations on a log-SNR-uniform grid",
    ),
    "sample_dpm_adaptive": KSampler(
        "dpm_adaptive",
        {},
        {
            "order": (3, Route("order")),
            "rtol": (0.05, Route("option", "rtol")),
            "atol": (0.0078, Route("option", "atol")),
            "h_init": (0.05, Route("option", "h_init")),
            "pcoeff": (
                0.0,
                Route(
                    "only",
                    value=0.0,
                    why="the step-size controller is DPM-Solver's Alg. 4, not a PID",
                ),
            ),
            "icoeff": (
                1.0,
                Route(
                    "only",
                    value=1.0,
                    why="the step-size controller is DPM-Solver's Alg. 4, not a PID",
                ),
            ),
            "dcoeff": (
                0.0,
                Route(
                    "only",
                    value=0.0,
                    why="the step-size controller is DPM-Solver's Alg. 4, not a PID",
                ),
            ),
            "accept_safety": (
                0.81,
                Route("only", value=0.81, why="the step-size controller is DPM-Solver's Alg. 4"),
            ),
            "eta": (0.0, _DETERMINISTIC_ONLY),
            "s_noise": (1.0, Route("inert")),
            "noise_sampler": (None, Route("inert")),
            "return_info": (False, Route("info")),
        },
        interface="adaptive",
        note="DPM-Solver-12/23 with DPM-Solver's step-size control (Sec. 4.2, Alg. 4)",
    ),
    "sample_dpmpp_2s_ancestral": KSampler("dpmpp_2s_ancestral", {}, _ANCESTRAL),
    "sample_dpmpp_sde": KSampler(
        "dpmpp_sde", {}, {**_ANCESTRAL, "r": (0.5, Route("option", "r1"))}
    ),
    "sample_dpmpp_2m": KSampler(
        "dpmpp_multistep",
        {"order": 2, "variant": "midpoint"},
        note="DPM-Solver++(2M), DPM-Solver++ Alg. 2",
    ),
    "sample_dpmpp_3m": KSampler(
        "dpmpp_multistep",
        {"order": 3},
        note="DPM-Solver++(3M) with the full second-derivative term (third order)",
    ),
    "sample_dpmpp_2m_sde": KSampler(
        "dpmpp_2m_sde", {}, {**_ANCESTRAL, "solver_type": ("midpoint", Route("option", "variant"))}
    ),
    "sample_dpmpp_3m_sde": KSampler("dpmpp_3m_sde", {}, _ANCESTRAL),
    "sample_ipndm": KSampler("ipndm", {}, {"max_order": (4, Route("order"))}),
    "sample_ipndm_v": KSampler("ipndm_v", {}, {"max_order": (4, Route("order"))}),
    "sample_deis": KSampler(
        "deis",
        {},
        {"max_order": (3, Route("order")), "deis_mode": ("tab", Route("option", "mode"))},
    ),
    "sample_uni_pc": KSampler("unipc", {"variant": "bh1"}),
    "sample_uni_pc_bh2": KSampler("unipc", {"variant": "bh2"}),
}


def _unavailable_reason(spec: KSampler) -> str | None:
    """Why ``spec`` cannot be offered with the solvers registered now (None if it can)."""
    if spec.solver not in REGISTRY and spec.solver not in ALIASES:
        return f"solver {spec.solver!r} is not registered"
    base = ALIASES[spec.solver][0] if spec.solver in ALIASES else spec.solver
    wanted = {k for k in spec.fixed if k != "order"}
    wanted |= {r.target for _, r in spec.params.values() if r.kind == "option"}
    missing = sorted(wanted - set(REGISTRY[base].options))
    if missing:
        return f"solver {spec.solver!r} has no option(s) {missing}"
    try:
        get_solver(spec.solver, **dict(spec.fixed))
    except (TypeError, ValueError) as err:
        return f"solver {spec.solver!r} rejects {dict(spec.fixed)}: {err}"
    return None


# --------------------------------------------------------------------------------------
# Running a sampler
# --------------------------------------------------------------------------------------


class _KDenoiser:
    """A k-diffusion denoiser ``model(x, sigma, **extra_args)`` as a dpmsolver denoiser on a
    VE schedule (``alpha = 1``, so the knot's sigma is k-diffusion's)."""

    def __init__(self, model: KModel, extra_args: Mapping[str, Any] | None) -> None:
        self.model = model
        self.extra_args = dict(extra_args or {})

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        return self.model(x, x.new_ones([x.shape[0]]) * knot.sigma, **self.extra_args)


class _Reporter:
    """k-diffusion's callback dict, from the loop's after-step :class:`StepInfo`: ``x`` is
    the state the step started from, as k-diffusion reports it. Also tells a k-diffusion
    noise sampler which step is running."""

    def __init__(self, callback: KCallback | None, x: Tensor, sigmas: list[Tensor]) -> None:
        self.callback = callback
        self.x = x
        self.sigmas = sigmas
        self.step = 0

    def __call__(self, info: StepInfo) -> None:
        if self.callback is not None:
            s = self.sigmas[info.index]
            self.callback(
                {
                    "x": self.x,
                    "i": info.index,
                    "sigma": s,
                    "sigma_hat": s,
                    "denoised": info.denoised,
                }
            )
        self.x = info.x
        self.step = info.index + 1


def _show_progress(disable: bool | None) -> bool:
    # k-diffusion passes disable to tqdm, where None means "only on a terminal".
    return (not disable) if disable is not None else sys.stderr.isatty()


def _schedule_for(levels: list[float]) -> VESchedule:
    positive = [v for v in levels if v > 0]
    if not positive:
        raise ValueError("sigmas must contain a positive value")
    lo, hi = min(positive), max(positive)
    return VESchedule(lo if lo < hi else hi / 2, hi)


def _sigma_list(sigmas: Tensor | list[float]) -> tuple[list[float], list[Tensor]]:
    t = torch.as_tensor(sigmas)
    if t.ndim != 1 or t.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D sequence of at least 2 values, got shape {tuple(t.shape)}"
        )
    return [float(v) for v in t.to(torch.float64).tolist()], list(t.unbind())


def _route_kwargs(
    name: str, spec: KSampler, kwargs: Mapping[str, Any]
) -> tuple[dict[str, Any], Any, bool]:
    """Validate k-diffusion keywords; return (solver options incl. order, noise sampler,
    return_info)."""
    unknown = sorted(set(kwargs) - set(spec.params))
    if unknown:
        accepted = ", ".join(["extra_args", "callback", "disable", *spec.params]) or "none"
        raise TypeError(
            f"{name}() got unexpected keyword argument(s) {unknown}; accepted: {accepted}"
        )
    options: dict[str, Any] = dict(spec.fixed)
    noise_sampler, info = None, False
    for key, (default, route) in spec.params.items():
        value = kwargs.get(key, default)
        if route.kind == "order":
            options["order"] = value
        elif route.kind == "option":
            options[route.target] = value
        elif route.kind == "noise":
            noise_sampler = value
        elif route.kind == "info":
            info = bool(value)
        elif route.kind == "only" and value != route.value:
            raise ValueError(
                f"{name}: {key}={value!r} is not supported; accepted values: {route.value!r} "
                f"({route.why})"
            )
    return options, noise_sampler, info


def _build(spec: KSampler, options: Mapping[str, Any]) -> Solver:
    opts = dict(options)
    order = opts.pop("order", None)
    return get_solver(spec.solver, order, **opts)


def _noise_source(solver: Solver, sampler: Any) -> Callable[[Tensor, Knot, Knot], Tensor] | None:
    """Noise for stochastic solvers: k-diffusion's ``noise_sampler(sigma, sigma_next)`` is
    asked for the interval the solver draws for; without one, fresh standard normal noise."""
    if not solver.stochastic:
        return None
    if sampler is None:
        return lambda x, s, t: torch.randn_like(x)
    return SigmaNoise(sampler)


def _run(
    name: str,
    spec: KSampler,
    model: KModel,
    x: Tensor,
    grid: TimeGrid,
    sigma_values: list[Tensor],
    *,
    extra_args: Mapping[str, Any] | None,
    callback: KCallback | None,
    disable: bool | None,
    kwargs: Mapping[str, Any],
    orders: list[int] | None = None,
) -> Tensor | tuple[Tensor, dict[str, int]]:
    options, noise_sampler, info = _route_kwargs(name, spec, kwargs)
    solver = _build(spec, options)
    if orders is None and not isinstance(solver, AdaptiveSolver):
        # k-diffusion's samplers keep their order to the end (only the step to 0 is Euler).
        orders = solver_orders(
            solver, steps=grid.steps, final_zero=grid.final_zero, lower_order_final=False
        )
    reporter = _Reporter(callback, x, sigma_values)
    result = solve(
        _KDenoiser(model, extra_args),
        x,
        grid,
        solver,
        orders=orders,
        noise_sampler=_noise_source(solver, noise_sampler),
        callback=reporter,
        progress=_show_progress(disable),
    )
    if info:
        return result.x, {"nfe": result.nfe, "steps": result.grid.steps}
    return result.x


def _signature(spec: KSampler) -> inspect.Signature:
    p = inspect.Parameter
    lead = [p("model", p.POSITIONAL_OR_KEYWORD), p("x", p.POSITIONAL_OR_KEYWORD)]
    if spec.interface == "sigmas":
        lead.append(p("sigmas", p.POSITIONAL_OR_KEYWORD))
    else:
        lead += [p("sigma_min", p.POSITIONAL_OR_KEYWORD), p("sigma_max", p.POSITIONAL_OR_KEYWORD)]
        if spec.interface == "fast":
            lead.append(p("n", p.POSITIONAL_OR_KEYWORD))
    common = [
        p(n, p.POSITIONAL_OR_KEYWORD, default=None) for n in ("extra_args", "callback", "disable")
    ]
    rest = [p(k, p.KEYWORD_ONLY, default=d) for k, (d, _) in spec.params.items()]
    return inspect.Signature(lead + common + rest)


def _make_sampler(name: str, spec: KSampler) -> Callable[..., Any]:
    """The function for one table entry, with k-diffusion's signature."""
    if spec.interface == "sigmas":

        def sampler(
            model: KModel,
            x: Tensor,
            sigmas: Tensor,
            extra_args: Mapping[str, Any] | None = None,
            callback: KCallback | None = None,
            disable: bool | None = None,
            **kwargs: Any,
        ) -> Any:
            levels, values = _sigma_list(sigmas)
            grid = grid_from_sigmas(_schedule_for(levels), levels)
            return _run(
                name,
                spec,
                model,
                x,
                grid,
                values,
                extra_args=extra_args,
                callback=callback,
                disable=disable,
                kwargs=kwargs,
            )

    elif spec.interface == "fast":

        def sampler(  # type: ignore[misc]
            model: KModel,
            x: Tensor,
            sigma_min: float,
            sigma_max: float,
            n: int,
            extra_args: Mapping[str, Any] | None = None,
            callback: KCallback | None = None,
            disable: bool | None = None,
            **kwargs: Any,
        ) -> Any:
            sched = _range_schedule(sigma_min, sigma_max)
            options, _, _ = _route_kwargs(name, spec, kwargs)
            nfe = check_int("n", n, minimum=1)
            orders = solver_orders(
                _build(spec, options), nfe=nfe, final_zero=False, lower_order_final=False
            )
            grid = make_grid(sched, len(orders), "logsnr", final="t_min")
            values = [torch.tensor(v) for v in grid.ksigmas]
            return _run(
                name,
                spec,
                model,
                x,
                grid,
                values,
                extra_args=extra_args,
                callback=callback,
                disable=disable,
                kwargs=kwargs,
                orders=orders,
            )

    else:

        def sampler(  # type: ignore[misc]
            model: KModel,
            x: Tensor,
            sigma_min: float,
            sigma_max: float,
            extra_args: Mapping[str, Any] | None = None,
            callback: KCallback | None = None,
            disable: bool | None = None,
            **kwargs: Any,
        ) -> Any:
            grid = make_grid(_range_schedule(sigma_min, sigma_max), 1, "logsnr", final="t_min")
            values = [torch.tensor(v) for v in grid.ksigmas]
            return _run(
                name,
                spec,
                model,
                x,
                grid,
                values,
                extra_args=extra_args,
                callback=callback,
                disable=disable,
                kwargs=kwargs,
            )

    sampler.__name__ = sampler.__qualname__ = name
    sampler.__module__ = __name__
    sampler.__signature__ = _signature(spec)  # type: ignore[attr-defined]
    sampler.__doc__ = (
        f"k-diffusion's ``{name}`` over dpmsolver's ``{spec.solver}`` solver"
        f"{' with ' + str(dict(spec.fixed)) if spec.fixed else ''}. {spec.note}\n\n"
        "``model(x, sigma, **extra_args)`` returns the denoised ``x``; ``callback`` receives "
        "k-diffusion's dict ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step; "
        "``disable`` turns the progress bar off. Keyword arguments: "
        + (", ".join(f"{k}={d!r}" for k, (d, _) in spec.params.items()) or "none")
        + "."
    )
    return sampler


def _range_schedule(sigma_min: float, sigma_max: float) -> VESchedule:
    lo = check_finite_float("sigma_min", sigma_min, positive=True)
    hi = check_finite_float("sigma_max", sigma_max, positive=True)
    if not lo < hi:
        raise ValueError(f"sigma_min={lo} must be < sigma_max={hi}")
    return VESchedule(lo, hi)


UNAVAILABLE: dict[str, str] = {}
for _name, _spec in SAMPLERS.items():
    _why = _unavailable_reason(_spec)
    if _why is None:
        globals()[_name] = _make_sampler(_name, _spec)
        __all__.append(_name)
    else:
        UNAVAILABLE[_name] = _why


def __getattr__(name: str) -> Any:
    if name in UNAVAILABLE:
        raise AttributeError(f"{name} is not available: {UNAVAILABLE[name]}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
