"""The plain front end: :func:`sample` and :func:`invert`.

They build the denoiser from a network (parameterization, classifier-free and classifier
guidance, thresholding, correctors: :func:`build_denoiser`), resolve ``solver`` to a
:class:`~dpmsolver.recipe.Recipe` (a registry name, a recipe, or a named policy such as
``"auto"``), plan the run on the schedule and hand it to the one loop,
:func:`dpmsolver.loop.solve`. Everything beyond the common arguments goes in
:class:`SampleOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .denoiser import Denoiser, ModelDenoiser, Network
from .guidance import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DynamicThresholding,
    NormCap,
    X0Corrector,
)
from .loop import CheckFinite, NoiseSampler, NonFiniteError, SampleResult, StepInfo, solve
from .noise import SeededNoise
from .parameterization import Prediction
from .plan import Plan, solver_orders
from .recipe import DEFAULT_STEPS, POLICIES, PolicyRequest, Recipe, RecipeSource, resolve
from .schedules import Knot, NoiseSchedule
from .solvers import MultistepSolver
from .timegrid import GridKind

__all__ = [
    "NonFiniteError",
    "SampleOptions",
    "SampleResult",
    "StepInfo",
    "build_denoiser",
    "invert",
    "sample",
    "solve",
]


@dataclass(frozen=True)
class SampleOptions:
    """The less common arguments of :func:`sample` and :func:`invert`.

    Attributes:
        thresholding: dynamic thresholding of x0 (Imagen, Saharia et al. 2022, Sec. 2.3;
            DPM-Solver++ Sec. 3.2; default False), with ``thresholding_ratio`` (0.995) and
            ``thresholding_max_value`` (1.0).
        classifier: ``classifier(x, t, **classifier_kwargs) -> (B,)`` log-probabilities for
            classifier guidance (Dhariwal & Nichol 2021), ``classifier_scale`` its weight.
        x0_corrector: ``fn(x0, x, knot) -> x0`` applied to every data prediction.
        xt_corrector: ``fn(x, knot, step) -> x`` applied after every step.
        model_kwargs: extra network keyword arguments for every call.
        model_dtype: dtype for the network call (default: the noise's dtype if it is
            float16/bfloat16, else the state's).
        noise_sampler: noise source for stochastic solvers, ``noise_sampler(x, s, t) ->
            standard normal like x`` for the interval from knot ``s`` to ``t``
            (:class:`~dpmsolver.noise.NoiseSource`; default: a
            :class:`~dpmsolver.noise.SeededNoise` with per-sample seeds drawn from torch's
            global generator).
        return_intermediates: keep every state and data prediction (memory grows).
        check_finite: ``"end"`` (default), ``"step"`` or ``"off"``
            (:class:`~dpmsolver.loop.FiniteMonitor`).
        grad: keep autograd on, for gradients through the solver (default False: the run
            is under ``torch.no_grad()`` and keeps no graph).
    """

    thresholding: bool = False
    thresholding_ratio: float = 0.995
    thresholding_max_value: float = 1.0
    classifier: Callable[..., Tensor] | None = None
    classifier_scale: float | Tensor = 1.0
    classifier_kwargs: Mapping[str, Any] | None = None
    x0_corrector: Callable[[Tensor, Tensor, Knot], Tensor] | None = None
    xt_corrector: Callable[[Tensor, Knot, int], Tensor] | None = None
    model_kwargs: Mapping[str, Any] | None = None
    model_dtype: torch.dtype | None = None
    noise_sampler: NoiseSampler | None = None
    return_intermediates: bool = False
    check_finite: CheckFinite = "end"
    grad: bool = False


_DEFAULTS = SampleOptions()


def build_denoiser(
    model: Network,
    prediction: Prediction = "eps",
    *,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    options: SampleOptions | None = None,
) -> Denoiser:
    """Compose network -> (classifier-free guidance) -> parameterization -> (classifier
    guidance) -> (dynamic thresholding) -> (x0 corrector). Arguments as in :func:`sample`."""
    opts = options or _DEFAULTS
    network: Network = model
    kwargs = dict(opts.model_kwargs or {})
    guided = isinstance(guidance_scale, Tensor) or float(guidance_scale) != 1.0
    if guided or uncond is not None:
        if cond is None or uncond is None:
            raise ValueError(
                "classifier-free guidance (guidance_scale != 1) needs both cond and uncond"
            )
        network = ClassifierFreeGuidance(model, guidance_scale, cond, uncond)
    elif cond is not None:
        overlap = set(cond) & set(kwargs)
        if overlap:
            raise ValueError(f"cond and model_kwargs both set {sorted(overlap)}")
        kwargs.update(cond)
    den: Denoiser = ModelDenoiser(
        network, prediction, model_kwargs=kwargs, model_dtype=opts.model_dtype
    )
    if opts.classifier is not None:
        den = ClassifierGuidance(
            den, opts.classifier, opts.classifier_scale, opts.classifier_kwargs
        )
    if opts.thresholding:
        den = DynamicThresholding(den, opts.thresholding_ratio, opts.thresholding_max_value)
    if opts.x0_corrector is not None:
        den = X0Corrector(den, opts.x0_corrector)
    return den


def _model_dtype(opts: SampleOptions, x: Tensor) -> SampleOptions:
    if opts.model_dtype is None and x.dtype in (torch.float16, torch.bfloat16):
        return replace(opts, model_dtype=x.dtype)
    return opts


def _with_grid(recipe: Recipe, grid: GridKind | None) -> Recipe:
    if grid is None or grid == recipe.grid:
        return recipe
    return replace(recipe, grid=grid)


def _start(plan: Plan, *, own_start: bool) -> Knot:
    """Where ``noise`` is drawn: at pure noise where the grid starts below it on its own
    (``own_start``: the default grids start a thousandth below it,
    :func:`~.timegrid.make_grid`); the loop then takes the step to the first knot with its
    first evaluation (:attr:`~.timegrid.TimeGrid.pure_noise_entry`). Else at the grid's
    first knot (custom grids, fitted times, a recipe's ``t_start``, the step in of a noise
    prediction: :func:`_off_pure_noise`)."""
    entry = plan.grid.pure_noise_entry
    return entry if entry is not None and own_start else plan.grid.knots[0]


def _off_pure_noise(
    recipe: Recipe, schedule: NoiseSchedule, prediction: Prediction, budget: int | None
) -> Recipe:
    """A noise or score prediction says nothing about the data at pure noise (``alpha = 0``,
    rectified flow at ``t = 1``: there ``eps = x`` whatever the data), so with those
    predictions a schedule that starts there is started one time-uniform step later, from
    ``sigma * noise`` (which leaves out that knot's ``alpha x0``, a relative bias of its
    ``alpha``; pass the recipe a ``t_start`` to choose). Carrying the noise there from pure
    noise with the first evaluation, as the default grids do a thousandth in, was measured
    and not taken (stop 57, ``benchmarks/flow_entry.md``, ``unipc3_eps``): it lowers the
    typical sample's error (median-sample ratio 0.76 at 5-10 NFE, 0.44 at 12-25), but a
    whole step in, the data prediction made at the uncarried state is far off under strong
    guidance, and 12 cells blew up that this start kept finite (8 the other way)."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    if prediction not in ("eps", "score") or recipe.t_start is not None or recipe.timesteps:
        return recipe
    start = schedule.knot(schedule.t_max)
    if start.alpha != 0.0:
        return recipe
    n = max(budget or DEFAULT_STEPS, 2)
    return replace(recipe, t_start=schedule.t_max - (schedule.t_max - schedule.t_min) / n)


def sample(
    model: Network,
    noise: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    solver: str | Recipe | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: GridKind | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    sigmas: Sequence[float] | Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    profile: RecipeSource | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    options: SampleOptions | None = None,
) -> SampleResult:
    """Sample from a diffusion model: ``x_T = sigma_T * noise`` integrated to the data.

    Args:
        model: network ``model(x, t, **kwargs) -> output`` (``t``: ``(B,)`` network times).
        noise: standard normal noise of the sample shape; scaled by sigma at the start
            (on rectified flow's default grids: the state at pure noise, carried to the
            first knot a thousandth later by the first evaluation; :func:`.loop.solve`'s
            ``start``).
        schedule: the network's :class:`~dpmsolver.schedules.NoiseSchedule`.
        prediction: ``"eps"`` (default), ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``.
        solver: a registry name or alias (see ``dpmsolver.solvers``; default: the
            schedule's :func:`~dpmsolver.recipe.default_solver`: ``"dpmpp_2m"``, and
            ``"unipc"`` on rectified flow below guidance 5), a
            :class:`~dpmsolver.recipe.Recipe` (solver, order and options, grid, ends, final
            step), or ``"auto"``: the measured recommendation
            for this budget and guidance scale (:mod:`dpmsolver.auto`; ``steps`` is then
            read as the NFE budget).
        steps: number of grid steps (default 20 when neither steps nor nfe is given).
        nfe: network-evaluation budget instead of steps (exact for every solver that can
            spend it; ``fast`` solvers mix orders to do so).
        grid: time spacing (default: the recipe's, else ``"logsnr"``); see
            :mod:`dpmsolver.timegrid`.
        timesteps, sigmas: a custom grid (schedule times, or k-diffusion sigmas with an
            optional trailing 0) instead of ``steps``/``grid``.
        cond, uncond: network keyword arguments for the conditional and unconditional
            calls (classifier-free guidance batches them in one call).
        guidance_scale: classifier-free guidance weight (default 1 = no guidance; a
            ``(B,)`` tensor gives each sample its own).
        profile: with ``solver="auto"``, recipes fitted to this model
            (:class:`dpmsolver.tune.Profile`, from :func:`dpmsolver.tune.tune`): the one for
            this budget and guidance scale (a budget the profile lacks falls back to the
            default recipe with a warning; a profile of another schedule or prediction is an
            error).
        callback: called with a :class:`~dpmsolver.loop.StepInfo` after each step.
        progress: show a progress bar (default False).
        options: the rest (:class:`SampleOptions`).

    Returns:
        A :class:`~dpmsolver.loop.SampleResult`; ``result.x`` is the sample, ``result.nfe``
        the network evaluations spent.
    """
    opts = _model_dtype(options or _DEFAULTS, noise)
    w = float(guidance_scale.max()) if isinstance(guidance_scale, Tensor) else float(guidance_scale)
    if isinstance(solver, str) and solver in POLICIES:
        if timesteps is not None or sigmas is not None:
            raise ValueError(
                f"solver={solver!r} chooses its own grid: do not pass timesteps or sigmas"
            )
        budget = nfe if nfe is not None else (steps if steps is not None else DEFAULT_STEPS)
        if profile is not None and solver == "auto":
            recipe = profile.recipe(budget, w, schedule, prediction)
        else:
            recipe = resolve(solver, PolicyRequest(budget, w, schedule))
        # fitted knots imply the budget
        steps, nfe = None, (None if recipe.timesteps is not None else budget)
    else:
        if profile is not None:
            raise ValueError(f"profile= is used with solver='auto', not solver={solver!r}")
        recipe = resolve(solver, PolicyRequest(0, w, schedule))
    recipe = _off_pure_noise(_with_grid(recipe, grid), schedule, prediction, steps or nfe)
    custom = timesteps is not None or sigmas is not None
    own_start = recipe.t_start is None and not recipe.timesteps and not custom
    plan = recipe.plan(schedule, steps=steps, nfe=nfe, timesteps=timesteps, sigmas=sigmas)
    den = build_denoiser(
        model, prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale, options=opts
    )
    if recipe.x0_norm_cap is not None:
        den = NormCap(den, recipe.x0_norm_cap)
    noise_sampler = opts.noise_sampler
    if plan.solver.stochastic and noise_sampler is None:
        # Per-sample streams seeded from torch's global RNG (torch.manual_seed controls them).
        noise_sampler = SeededNoise(torch.randint(0, 2**62, (noise.shape[0],)).tolist())
    start = _start(plan, own_start=own_start)
    return solve(
        den,
        noise * start.sigma,
        plan,
        noise_sampler=noise_sampler,
        xt_corrector=opts.xt_corrector,
        callback=callback,
        progress=progress,
        return_intermediates=opts.return_intermediates,
        check_finite=opts.check_finite,
        final_step=recipe.final_step,
        step_limit=recipe.step_limiter(),
        compensation=recipe.compensation,
        correction=recipe.correction,
        grad=opts.grad,
        start=start,
    )


def invert(
    model: Network,
    x: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    solver: str | Recipe = "dpmpp_2m",
    steps: int | None = None,
    nfe: int | None = None,
    grid: GridKind | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    options: SampleOptions | None = None,
) -> SampleResult:
    """Invert data to noise: integrate the probability-flow ODE from the recipe's last
    noisy time (where ``x`` is taken as the state) up to its first, with the same solvers
    run backwards (DDIM inversion generalised; Lu et al. 2022 Sec. 3 holds for h < 0).

    ``result.x`` is normalized like :func:`sample`'s ``noise`` (state / sigma at the start
    time), so ``sample(model, result.x, ..., solver=Recipe(..., final="t_min"))`` with the
    same settings maps it back to ``x``. Arguments mean what they mean in :func:`sample`,
    except that the solver defaults to ``"dpmpp_2m"`` on every schedule (UniPC's
    corrector, sample's flow default, is not an inversion method);
    the grid is the sampling grid with ``final="t_min"``, reversed (the recipe's
    ``lower_order_final`` applies to the inverted run; thresholding, classifier guidance
    and correctors do not apply).
    """
    opts = _model_dtype(options or _DEFAULTS, x)
    recipe = _with_grid(resolve(solver, PolicyRequest(0, 1.0, schedule)), grid)
    forward = replace(recipe, final="t_min", lower_order_final=False)
    plan = forward.plan(schedule, steps=steps, nfe=nfe, timesteps=timesteps)
    g = plan.grid.reversed()
    if isinstance(plan.solver, MultistepSolver):
        # The multistep warm-up restarts at the data end.
        orders = solver_orders(
            plan.solver, steps=g.steps, final_zero=False, lower_order_final=recipe.lower_order_final
        )
    else:
        orders = plan.orders[::-1]
    den = build_denoiser(
        model,
        prediction,
        cond=cond,
        uncond=uncond,
        guidance_scale=guidance_scale,
        options=SampleOptions(model_kwargs=opts.model_kwargs, model_dtype=opts.model_dtype),
    )
    res = solve(
        den,
        x,
        g,
        plan.solver,
        orders=orders,
        callback=callback,
        progress=progress,
        check_finite=opts.check_finite,
        grad=opts.grad,
    )
    res.x = res.x / g.knots[-1].sigma
    return res
