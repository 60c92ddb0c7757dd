"""The one sampling loop, and the convenience entry points built on it.

:func:`solve` runs any registered solver over a :class:`~dpmsolver.timegrid.TimeGrid` with a
denoiser. It owns everything that is not a solver's own arithmetic: warm-up and
lower-order final steps (through the solver's ``plan``), the first-order step out of pure
noise and the data-prediction step to ``sigma = 0``, adaptive step control, network
evaluation counting, NaN/Inf detection, callbacks, intermediates and the progress bar.

:func:`sample` and :func:`invert` build the denoiser (parameterization, guidance,
thresholding) and the grid from plain arguments, then call :func:`solve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._validate import check_choice, check_int
from .auto import recommend
from .denoiser import Denoiser, ModelDenoiser, Network
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, DynamicThresholding, X0Corrector
from .noise import SeededNoise
from .parameterization import Prediction
from .progress import Progress
from .schedules import Knot, NoiseSchedule
from .solvers import AdaptiveDPMSolver, Solver, StepContext, boundary_update, get_solver, step_order
from .timegrid import Final, GridKind, TimeGrid, grid_from_sigmas, grid_from_timesteps, make_grid

__all__ = [
    "NonFiniteError",
    "SampleResult",
    "StepInfo",
    "build_denoiser",
    "invert",
    "sample",
    "solve",
]

CheckFinite = Literal["end", "step", "off"]
FinalStep = Literal["denoise", "extrapolate"]
NoiseSampler = Callable[[Tensor], Tensor]


class NonFiniteError(FloatingPointError):
    """NaN or Inf appeared in the state; names the first step, its time and the samples.

    Attributes:
        step, t, sigma: the first step that produced a non-finite value, and where it went.
        samples: batch positions that were non-finite after that step.
        sample_steps: every batch position that went non-finite, mapped to the first step
            it did (with ``check_finite="end"`` this covers the whole run; with ``"step"``
            the run stopped, so only ``samples``).
        x: with ``check_finite="end"``, the final state (as :func:`solve` would have
            returned it); rows not in ``sample_steps`` stayed finite at every step, so a
            caller can keep them. None with ``"step"``.
    """

    def __init__(
        self,
        step: int,
        t: float,
        sigma: float,
        samples: list[int],
        *,
        sample_steps: dict[int, int] | None = None,
        x: Tensor | None = None,
    ) -> None:
        self.step, self.t, self.sigma, self.samples = step, t, sigma, samples
        self.sample_steps = sample_steps if sample_steps is not None else dict.fromkeys(samples, step)
        self.x = x
        shown = samples[:20]
        more = f" (+{len(samples) - len(shown)} more)" if len(samples) > len(shown) else ""
        super().__init__(
            f"non-finite values (NaN/Inf) appeared at step {step} (to t={t:.6g}, sigma={sigma:.6g}) "
            f"in batch samples {shown}{more}"
        )


@dataclass(frozen=True)
class StepInfo:
    """What a callback receives after each step.

    Attributes:
        index: step number (0-based).
        x: the state after the step (at ``t_next``).
        denoised: the data prediction at the step's start (at ``t``).
        t, t_next: schedule times of the step's ends; ``sigma``, ``sigma_next`` their
            noise scales (``sigma_next = 0`` for the final data-prediction step).
        nfe: network evaluations spent so far.
    """

    index: int
    x: Tensor
    denoised: Tensor
    t: float
    t_next: float
    sigma: float
    sigma_next: float
    nfe: int


@dataclass
class SampleResult:
    """Output of a sampling or inversion run.

    Attributes:
        x: the final state (cast back to the input dtype).
        nfe: network evaluations actually spent.
        planned_nfe: evaluations the plan claimed (None for adaptive solvers).
        grid: the time grid used.
        orders: the order used at each grid step.
        trajectory: states after every step (if requested).
        denoised: data predictions at every step's start (if requested).
    """

    x: Tensor
    nfe: int
    planned_nfe: int | None
    grid: TimeGrid
    orders: list[int]
    trajectory: list[Tensor] | None = None
    denoised: list[Tensor] | None = field(default=None)


class _Evaluator:
    """Calls the denoiser, counts evaluations, keeps the solver's working dtype."""

    def __init__(self, denoiser: Denoiser, dtype: torch.dtype) -> None:
        self.denoiser = denoiser
        self.dtype = dtype
        self.nfe = 0

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        self.nfe += 1
        out = self.denoiser(x, knot)
        return out if out.dtype == self.dtype else out.to(self.dtype)


class _FiniteMonitor:
    """Detects NaN/Inf without a host sync per step (``"end"``): each step stores a
    per-sample sum on the device (NaN/Inf propagate into it) and the log is read once."""

    def __init__(self, mode: CheckFinite, knots: tuple[Knot, ...]) -> None:
        self.mode = check_choice("check_finite", mode, ("end", "step", "off"))
        self.knots = knots
        self.sums: list[Tensor] = []

    def _raise(
        self, step: int, bad: Tensor, sample_steps: dict[int, int] | None = None, x: Tensor | None = None
    ) -> None:
        k = self.knots[step + 1]
        samples = torch.nonzero(bad).flatten().tolist()
        raise NonFiniteError(step, k.t, k.sigma, samples, sample_steps=sample_steps, x=x)

    def record(self, step: int, x: Tensor) -> None:
        if self.mode == "off":
            return
        total = x.reshape(x.shape[0], -1).sum(1)
        if self.mode == "step":
            bad = ~torch.isfinite(total)
            if bool(bad.any()):
                self._raise(step, bad)
        else:
            self.sums.append(total)

    def finish(self, x: Tensor | None = None) -> None:
        """Raise if any recorded step was non-finite; ``x`` (the final state) rides along
        so that callers can keep the samples that stayed finite."""
        if not self.sums:
            return
        bad = ~torch.isfinite(torch.stack(self.sums))  # (steps, batch)
        if bool(bad.any()):
            step = int(torch.nonzero(bad.any(1)).flatten()[0])
            ever = bad.any(0)
            first = bad.to(torch.int8).argmax(0)  # first True per sample
            positions = torch.nonzero(ever).flatten().tolist()
            sample_steps = dict(zip(positions, first[ever].tolist(), strict=True))
            self._raise(step, bad[step], sample_steps, x)


def _effective_orders(solver: Solver, grid: TimeGrid, orders: list[int]) -> list[int]:
    if len(orders) != grid.steps:
        raise ValueError(f"orders has {len(orders)} entries but the grid has {grid.steps} steps")
    out = []
    for i, o in enumerate(orders):
        check_int(f"orders[{i}]", o, minimum=1)
        if o > solver.order:
            raise ValueError(f"orders[{i}]={o} exceeds the solver's order {solver.order}")
        out.append(step_order(solver, grid.knots[i], grid.knots[i + 1], o))
    return out


def _adaptive_interval(
    solver: AdaptiveDPMSolver,
    ev: _Evaluator,
    x: Tensor,
    x0: Tensor,
    s: Knot,
    end: Knot,
    schedule: NoiseSchedule,
    index: int,
) -> Tensor:
    """Integrate from ``s`` to ``end`` with DPM-Solver-12/23 step control."""
    direction = 1.0 if end.lam > s.lam else -1.0
    cur, x_prev = s, x
    h = solver.h_init
    m: Tensor | None = x0
    for _ in range(100_000):
        if cur is end:
            return x
        remaining = abs(end.lam - cur.lam)
        nxt = end if h >= remaining else schedule.knot_at_lambda(cur.lam + direction * h)
        if m is None:
            m = ev(x, cur)
        ctx = StepContext(index, cur, nxt, solver.order, ev, schedule)
        x_high, x_low = solver.attempt(ctx, x, m)
        err = solver.error(x_high, x_low, x_prev)
        if not math.isfinite(err):
            raise NonFiniteError(index, nxt.t, nxt.sigma, list(range(x.shape[0])))
        if err <= 1.0:
            x_prev, x, cur, m = x_low, x_high, nxt, None
        h = solver.next_h(h, err, abs(end.lam - cur.lam))
        if cur is not end and h < 1e-10:
            raise RuntimeError(f"adaptive step size collapsed at t={cur.t:.6g}; loosen rtol/atol")
    raise RuntimeError("adaptive solver did not finish in 100000 attempts")


def solve(
    denoiser: Denoiser,
    x: Tensor,
    grid: TimeGrid,
    solver: Solver,
    *,
    orders: list[int] | None = None,
    lower_order_final: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    xt_corrector: Callable[[Tensor, Knot, int], Tensor] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
    check_finite: CheckFinite = "end",
    final_step: FinalStep = "denoise",
) -> SampleResult:
    """Run ``solver`` over ``grid`` starting from the state ``x`` at ``grid.knots[0]``.

    Args:
        denoiser: ``x0_hat = denoiser(x, knot)``.
        x: initial state (any float dtype; solver arithmetic runs in at least float32).
        grid: the time grid (sampling or inversion).
        solver: a :class:`~dpmsolver.solvers.Solver`.
        orders: order per grid step (default: ``solver.plan``).
        lower_order_final: lower the order of the last steps (default: when fewer than 15
            steps, as diffusers does).
        noise_sampler: ``noise_sampler(x) -> standard normal like x`` for stochastic solvers.
        xt_corrector: ``xt_corrector(x, knot, step) -> x`` applied after each step.
        callback: called with a :class:`StepInfo` after each step.
        progress: show a progress bar on stderr (default False).
        return_intermediates: keep every state and data prediction (memory grows).
        check_finite: ``"end"`` (default; one host sync at the end), ``"step"`` (stop at
            the first bad step) or ``"off"``. A NaN/Inf raises :class:`NonFiniteError`.
        final_step: the step into sigma = 0. ``"denoise"`` (default; DPM-Solver++ Sec. 3.1,
            diffusers, k-diffusion): ``x = x0_hat``. ``"extrapolate"``: the exact solution at
            sigma = 0 is the limit of ``x0_hat`` along the trajectory, whose expansion in
            k-diffusion's sigma~ has no linear term (``x0_hat = x(0) - sigma~^2 x~''(0)/2 +
            O(sigma~^3)``), so extrapolating the last two data predictions in ``sigma~^2``
            removes the denoising step's O(sigma~^2) bias at no extra evaluation
            (deterministic solvers only).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if solver.stochastic and noise_sampler is None:
        raise ValueError(f"{type(solver).__name__} is stochastic: pass noise_sampler")
    schedule = grid.schedule
    if orders is None:
        lof = grid.steps < 15 if lower_order_final is None else bool(lower_order_final)
        orders = solver.plan(steps=grid.steps, nfe=None, final_zero=grid.final_zero, lower_order_final=lof)
    orders = _effective_orders(solver, grid, orders)
    adaptive = isinstance(solver, AdaptiveDPMSolver)
    planned = None if adaptive else sum(
        1 if (math.isinf(grid.knots[i + 1].lam) and not solver.steps_into_zero) else solver.step_evals(i, o)
        for i, o in enumerate(orders)
    )

    in_dtype = x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    x = x.to(work)
    ev = _Evaluator(denoiser, work)
    monitor = _FiniteMonitor(check_finite, grid.knots)
    bar = Progress(grid.steps, enabled=progress)
    trajectory: list[Tensor] | None = [] if return_intermediates else None
    denoised: list[Tensor] | None = [] if return_intermediates else None
    check_choice("final_step", final_step, ("denoise", "extrapolate"))
    extrapolate = final_step == "extrapolate" and not solver.stochastic
    state = solver.init_state()
    prev: tuple[Tensor, Knot] | None = None
    try:
        for i, order in enumerate(orders):
            s, t = grid.knots[i], grid.knots[i + 1]
            x0 = ev(x, s)
            boundary = boundary_update(solver, x, x0, s, t)
            if boundary is not None:
                x_next = boundary
                if extrapolate and t.lam == math.inf and prev is not None and prev[1].ksigma > s.ksigma:
                    s0, s1 = s.ksigma**2, prev[1].ksigma ** 2
                    x_next = x0.add(x0 - prev[0], alpha=s0 / (s1 - s0))
            elif adaptive:
                assert isinstance(solver, AdaptiveDPMSolver)
                x_next = _adaptive_interval(solver, ev, x, x0, s, t, schedule, i)
            else:
                noise = None if noise_sampler is None else _bind(noise_sampler, x)
                ctx = StepContext(i, s, t, order, ev, schedule, noise)
                x_next, state = solver.step(ctx, x, x0, state)
            if xt_corrector is not None and not math.isinf(t.lam):
                x_next = xt_corrector(x_next, t, i)
            monitor.record(i, x_next)
            if trajectory is not None and denoised is not None:
                trajectory.append(x_next)
                denoised.append(x0)
            if callback is not None:
                callback(StepInfo(i, x_next, x0, s.t, t.t, s.sigma, t.sigma, ev.nfe))
            x = x_next
            prev = (x0, s)
            bar.update()
        out = x.to(in_dtype)
        monitor.finish(out)
    finally:
        bar.close()
    return SampleResult(
        x=out,
        nfe=ev.nfe,
        planned_nfe=planned,
        grid=grid,
        orders=orders,
        trajectory=trajectory,
        denoised=denoised,
    )


def _bind(noise_sampler: NoiseSampler, x: Tensor) -> Callable[[], Tensor]:
    return lambda: noise_sampler(x)


def build_denoiser(
    model: Network,
    *,
    prediction: Prediction = "eps",
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    classifier: Callable[..., Tensor] | None = None,
    classifier_scale: float | Tensor = 1.0,
    classifier_kwargs: Mapping[str, Any] | None = None,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
    x0_corrector: Callable[[Tensor, Tensor, Knot], Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
) -> Denoiser:
    """Compose network -> (classifier-free guidance) -> parameterization -> (classifier
    guidance) -> (dynamic thresholding) -> (x0 corrector). Arguments as in :func:`sample`."""
    network: Network = model
    kwargs = dict(model_kwargs or {})
    guided = isinstance(guidance_scale, Tensor) or float(guidance_scale) != 1.0
    if guided or uncond is not None:
        if cond is None or uncond is None:
            raise ValueError("classifier-free guidance (guidance_scale != 1) needs both cond and uncond")
        network = ClassifierFreeGuidance(model, guidance_scale, cond, uncond)
    elif cond is not None:
        overlap = set(cond) & set(kwargs)
        if overlap:
            raise ValueError(f"cond and model_kwargs both set {sorted(overlap)}")
        kwargs.update(cond)
    den: Denoiser = ModelDenoiser(network, prediction, model_kwargs=kwargs, model_dtype=model_dtype)
    if classifier is not None:
        den = ClassifierGuidance(den, classifier, classifier_scale, classifier_kwargs)
    if thresholding:
        den = DynamicThresholding(den, thresholding_ratio, thresholding_max_value)
    if x0_corrector is not None:
        den = X0Corrector(den, x0_corrector)
    return den


def _resolve(
    schedule: NoiseSchedule,
    solver: Solver,
    *,
    steps: int | None,
    nfe: int | None,
    grid: GridKind,
    t_start: float | None,
    t_end: float | None,
    final: Final,
    rho: float | None,
    timesteps: Any,
    sigmas: Any,
    lower_order_final: bool | None,
) -> tuple[TimeGrid, list[int]]:
    """Build the grid and per-step orders from user arguments."""
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    custom = timesteps is not None or sigmas is not None
    if timesteps is not None and sigmas is not None:
        raise ValueError("give at most one of timesteps and sigmas")
    if steps is not None and nfe is not None:
        raise ValueError("give at most one of steps and nfe")
    if steps is not None:
        check_int("steps", steps, minimum=1)
    if nfe is not None:
        check_int("nfe", nfe, minimum=1)
    if isinstance(solver, AdaptiveDPMSolver):
        if steps is not None or nfe is not None or custom:
            raise ValueError("adaptive solvers choose their own steps: do not pass steps, nfe, timesteps or sigmas (tune rtol/atol)")
        g = make_grid(schedule, 2 if final == "zero" else 1, "logsnr", t_start=t_start, t_end=t_end, final=final)
        return g, [solver.order] * g.steps
    if custom:
        if steps is not None or nfe is not None:
            raise ValueError("steps/nfe are implied by timesteps/sigmas; do not pass both")
        g = grid_from_sigmas(schedule, sigmas) if sigmas is not None else grid_from_timesteps(schedule, timesteps, final=final)
        steps = g.steps
    if steps is None and nfe is None:
        steps = 20
    final_zero = final == "zero"
    lof_n = steps if steps is not None else nfe
    assert lof_n is not None
    lof = lof_n < 15 if lower_order_final is None else bool(lower_order_final)
    if custom:
        orders = solver.plan(steps=steps, nfe=None, final_zero=g.final_zero, lower_order_final=lof)
        return g, orders
    orders = solver.plan(steps=steps, nfe=nfe, final_zero=final_zero, lower_order_final=lof)
    g = make_grid(schedule, len(orders), grid, t_start=t_start, t_end=t_end, final=final, rho=rho)
    return g, orders


def _build_solver(name: str, order: int | None, solver_options: Mapping[str, Any] | None) -> Solver:
    """``get_solver`` with the order accepted either as ``order`` or inside ``solver_options``
    (as a :class:`~dpmsolver.auto.Recipe` spells it)."""
    options = dict(solver_options or {})
    if "order" in options:
        if order is not None and order != options["order"]:
            raise ValueError(f"order={order} and solver_options['order']={options['order']} disagree; pass one of them")
        order = options.pop("order")
    return get_solver(name, order, **options)


def sample(
    model: Network,
    noise: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    solver: str = "dpmpp_2m",
    order: int | None = None,
    solver_options: Mapping[str, Any] | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: GridKind | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    final: Final = "zero",
    rho: float | None = None,
    timesteps: Any = None,
    sigmas: Any = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    classifier: Callable[..., Tensor] | None = None,
    classifier_scale: float | Tensor = 1.0,
    classifier_kwargs: Mapping[str, Any] | None = None,
    thresholding: bool = False,
    thresholding_ratio: float = 0.995,
    thresholding_max_value: float = 1.0,
    x0_corrector: Callable[[Tensor, Tensor, Knot], Tensor] | None = None,
    xt_corrector: Callable[[Tensor, Knot, int], Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    lower_order_final: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
    check_finite: CheckFinite = "end",
    final_step: FinalStep | None = None,
) -> SampleResult:
    """Sample from a diffusion model: ``x_T = sigma_T * noise`` integrated to the data.

    Args:
        model: network ``model(x, t, **kwargs) -> output`` (``t``: ``(B,)`` network times).
        noise: standard normal noise of the sample shape; scaled by sigma at ``t_start``.
        schedule: the network's :class:`~dpmsolver.schedules.NoiseSchedule`.
        prediction: ``"eps"`` (default), ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``.
        solver: registry name or alias (default ``"dpmpp_2m"``; see ``dpmsolver.solvers``),
            or ``"auto"``: the measured recommendation for this budget and guidance scale
            (:func:`dpmsolver.auto.recommend`; ``steps`` is then read as the NFE budget, and
            arguments left at None take the recipe's values).
        order: solver order (default: the solver's default).
        solver_options: extra solver options (e.g. ``{"variant": "heun"}``).
        steps: number of grid steps (default 20 when neither steps nor nfe is given).
        nfe: network-evaluation budget instead of steps (exact for every solver that can
            spend it; ``fast`` solvers mix orders to do so).
        grid: time spacing (default ``"logsnr"``); see :mod:`dpmsolver.timegrid`.
        t_start, t_end: start time and last noisy time (default: the schedule's range).
        final: ``"zero"`` (default) ends with the data-prediction step to sigma = 0;
            ``"t_min"`` stops at ``t_end``.
        rho: exponent for ``karras`` / ``polyexponential`` grids.
        timesteps, sigmas: a custom grid (schedule times, or k-diffusion sigmas with an
            optional trailing 0) instead of ``steps``/``grid``.
        cond, uncond: network keyword arguments for the conditional and unconditional
            calls (classifier-free guidance batches them in one call).
        guidance_scale: classifier-free guidance weight (default 1 = no guidance).
        classifier: ``classifier(x, t, **classifier_kwargs) -> (B,)`` log-probabilities for
            classifier guidance; ``classifier_scale`` its weight (default 1).
        thresholding: dynamic thresholding of x0 (default False), with
            ``thresholding_ratio`` (0.995) and ``thresholding_max_value`` (1.0).
        x0_corrector: ``fn(x0, x, knot) -> x0`` applied to every data prediction.
        xt_corrector: ``fn(x, knot, step) -> x`` applied after every step.
        model_kwargs: extra network keyword arguments for every call.
        model_dtype: dtype for the network call (default: the noise's dtype if it is
            float16/bfloat16, else the state's).
        lower_order_final: lower-order final steps (default: when fewer than 15 steps).
        noise_sampler: noise source for stochastic solvers, ``noise_sampler(x) -> noise like
            x`` (default: a :class:`~dpmsolver.noise.SeededNoise` with per-sample seeds drawn
            from torch's global generator).
        callback, progress, return_intermediates, check_finite, final_step: see
            :func:`solve`.

    Returns:
        A :class:`SampleResult`; ``result.x`` is the sample, ``result.nfe`` the network
        evaluations spent.
    """
    if solver == "auto":
        if timesteps is not None or sigmas is not None:
            raise ValueError("solver='auto' chooses its own grid: do not pass timesteps or sigmas")
        budget = nfe if nfe is not None else (steps if steps is not None else 20)
        w = float(guidance_scale.max()) if isinstance(guidance_scale, Tensor) else float(guidance_scale)
        recipe = recommend(budget, w)
        solver, steps, nfe = recipe.solver, None, budget
        solver_options = {**recipe.options, **dict(solver_options or {})}
        if order is not None:  # the caller's order overrides the recipe's
            solver_options.pop("order", None)
        grid = grid if grid is not None else recipe.grid  # type: ignore[assignment]
        rho = rho if rho is not None else recipe.rho
        t_end = t_end if t_end is not None else recipe.t_end(schedule)
        final_step = final_step if final_step is not None else recipe.final_step  # type: ignore[assignment]
    solver_obj = _build_solver(solver, order, solver_options)
    g, orders = _resolve(
        schedule, solver_obj, steps=steps, nfe=nfe, grid=grid or "logsnr", t_start=t_start, t_end=t_end,
        final=final, rho=rho, timesteps=timesteps, sigmas=sigmas, lower_order_final=lower_order_final,
    )
    if model_dtype is None and noise.dtype in (torch.float16, torch.bfloat16):
        model_dtype = noise.dtype
    den = build_denoiser(
        model, prediction=prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
        classifier=classifier, classifier_scale=classifier_scale, classifier_kwargs=classifier_kwargs,
        thresholding=thresholding, thresholding_ratio=thresholding_ratio,
        thresholding_max_value=thresholding_max_value, x0_corrector=x0_corrector,
        model_kwargs=model_kwargs, model_dtype=model_dtype,
    )
    if solver_obj.stochastic and noise_sampler is None:
        # Per-sample streams seeded from torch's global RNG (torch.manual_seed controls them).
        noise_sampler = SeededNoise(torch.randint(0, 2**62, (noise.shape[0],)).tolist())
    x_start = noise * g.knots[0].sigma
    return solve(
        den, x_start, g, solver_obj, orders=orders, noise_sampler=noise_sampler,
        xt_corrector=xt_corrector, callback=callback, progress=progress,
        return_intermediates=return_intermediates, check_finite=check_finite,
        final_step=final_step or "denoise",
    )


def invert(
    model: Network,
    x: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    solver: str = "dpmpp_2m",
    order: int | None = None,
    solver_options: Mapping[str, Any] | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: GridKind = "logsnr",
    t_start: float | None = None,
    t_end: float | None = None,
    rho: float | None = None,
    timesteps: Any = None,
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Tensor = 1.0,
    model_kwargs: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    lower_order_final: bool | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    check_finite: CheckFinite = "end",
) -> SampleResult:
    """Invert data to noise: integrate the probability-flow ODE from ``t_end`` (where ``x``
    is taken as the state) up to ``t_start``, with the same solvers run backwards
    (DDIM inversion generalised; Lu et al. 2022 Sec. 3 holds for h < 0).

    ``result.x`` is normalized like :func:`sample`'s ``noise`` (state / sigma at
    ``t_start``), so ``sample(model, result.x, ..., final="t_min")`` with the same settings
    maps it back to ``x``. Arguments mean what they mean in :func:`sample`; the grid is the
    sampling grid with ``final="t_min"``, reversed.
    """
    solver_obj = _build_solver(solver, order, solver_options)
    g, orders = _resolve(
        schedule, solver_obj, steps=steps, nfe=nfe, grid=grid, t_start=t_start, t_end=t_end,
        final="t_min", rho=rho, timesteps=timesteps, sigmas=None, lower_order_final=False,
    )
    g = g.reversed()
    if solver_obj.kind == "multistep":
        lof = g.steps < 15 if lower_order_final is None else lower_order_final
        orders = solver_obj.plan(steps=g.steps, nfe=None, final_zero=False, lower_order_final=lof)
    else:
        orders = orders[::-1]
    if model_dtype is None and x.dtype in (torch.float16, torch.bfloat16):
        model_dtype = x.dtype
    den = build_denoiser(
        model, prediction=prediction, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
        model_kwargs=model_kwargs, model_dtype=model_dtype,
    )
    res = solve(den, x, g, solver_obj, orders=orders, callback=callback, progress=progress, check_finite=check_finite)
    res.x = res.x / g.knots[-1].sigma
    return res
