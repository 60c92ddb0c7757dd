"""The one sampling loop.

:func:`solve` runs any registered solver over a :class:`~dpmsolver.timegrid.TimeGrid` with a
denoiser. Per step it evaluates the denoiser at the step's start, and then either the
driver takes a boundary step itself (into ``sigma = 0``: the data prediction, optionally
extrapolated; see :class:`FinalStep`), a :class:`StepSizeController` integrates the
interval (adaptive solvers), or the solver takes its step. The small parts around that
loop: :class:`Evaluator` (evaluation count and working dtype), :class:`FiniteMonitor`
(NaN/Inf detection without a host sync per step), :class:`Recorder` (intermediates and
callbacks) and the progress bar. What each step is (its order and cost) comes from the
plan (:mod:`dpmsolver.plan`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._validate import check_choice
from .compensation import Compensation
from .correction import Correction
from .denoiser import Denoiser
from .plan import Plan, PlannedStep, boundary_update, make_plan
from .progress import Progress
from .schedules import Knot, NoiseSchedule
from .solvers import AdaptiveSolver, Form, Solver, StepContext, first_order_step
from .steplimit import StepHook
from .timegrid import TimeGrid

__all__ = [
    "CheckFinite",
    "Evaluator",
    "FinalStep",
    "FinalStepKind",
    "FiniteMonitor",
    "NoiseSampler",
    "NonFiniteError",
    "Recorder",
    "SampleResult",
    "StepInfo",
    "StepSizeController",
    "solve",
]

CheckFinite = Literal["end", "step", "off"]
FinalStepKind = Literal["denoise", "extrapolate"]
NoiseSampler = Callable[[Tensor, Knot, Knot], Tensor]


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
        self.sample_steps = (
            sample_steps if sample_steps is not None else dict.fromkeys(samples, step)
        )
        self.x = x
        shown = samples[:20]
        more = f" (+{len(samples) - len(shown)} more)" if len(samples) > len(shown) else ""
        super().__init__(
            f"non-finite values (NaN/Inf) appeared at step {step} (to t={t:.6g}, "
            f"sigma={sigma:.6g}) in batch samples {shown}{more}"
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


# ----------------------------------------------------------------------------------------
# The parts
# ----------------------------------------------------------------------------------------


class Evaluator:
    """Calls the denoiser, counts evaluations, keeps the solver's working dtype."""

    def __init__(self, denoiser: Denoiser, dtype: torch.dtype) -> None:
        self.denoiser = denoiser
        self.dtype = dtype
        self.nfe = 0

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        self.nfe += 1
        out = self.denoiser(x, knot)
        return out if out.dtype == self.dtype else out.to(self.dtype)


class FiniteMonitor:
    """Detects NaN/Inf without a host sync per step (``"end"``): each step stores a
    per-sample sum on the device (NaN/Inf propagate into it) and the log is read once."""

    def __init__(self, mode: CheckFinite, knots: tuple[Knot, ...]) -> None:
        self.mode = check_choice("check_finite", mode, ("end", "step", "off"))
        self.knots = knots
        self.sums: list[Tensor] = []

    def _raise(
        self,
        step: int,
        bad: Tensor,
        sample_steps: dict[int, int] | None = None,
        x: Tensor | None = None,
    ) -> None:
        k = self.knots[step + 1]
        samples = torch.nonzero(bad).flatten().tolist()
        raise NonFiniteError(step, k.t, k.sigma, samples, sample_steps=sample_steps, x=x)

    def record(self, step: int, x: Tensor) -> None:
        """Log the state after ``step`` (``"step"``: check it now)."""
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


class Recorder:
    """Keeps the intermediates (if asked) and reports each step to the callback."""

    def __init__(self, keep: bool, callback: Callable[[StepInfo], None] | None) -> None:
        self.trajectory: list[Tensor] | None = [] if keep else None
        self.denoised: list[Tensor] | None = [] if keep else None
        self.callback = callback

    def record(self, step: PlannedStep, x_next: Tensor, x0: Tensor, nfe: int) -> None:
        """The state after ``step`` and the data prediction at its start."""
        if self.trajectory is not None and self.denoised is not None:
            self.trajectory.append(x_next)
            self.denoised.append(x0)
        if self.callback is not None:
            s, t = step.s, step.t
            self.callback(StepInfo(step.index, x_next, x0, s.t, t.t, s.sigma, t.sigma, nfe))


class FinalStep:
    """The boundary steps, and how the step into ``sigma = 0`` is taken.

    ``"denoise"`` (DPM-Solver++ Sec. 3.1, diffusers, k-diffusion): ``x = x0_hat``.
    ``"extrapolate"``: the exact solution at sigma = 0 is the limit of ``x0_hat`` along the
    trajectory, whose expansion in k-diffusion's sigma~ has no linear term (``x0_hat = x(0) -
    sigma~^2 x~''(0)/2 + O(sigma~^3)``), so extrapolating the last two data predictions in
    ``sigma~^2`` removes the denoising step's O(sigma~^2) bias at no extra evaluation
    (deterministic solvers only).
    """

    def __init__(self, kind: FinalStepKind, solver: Solver) -> None:
        check_choice("final_step", kind, ("denoise", "extrapolate"))
        self.extrapolate = kind == "extrapolate" and not solver.stochastic
        self.prev: tuple[Tensor, Knot] | None = None

    def take(self, x: Tensor, x0: Tensor, s: Knot, t: Knot) -> Tensor:
        """The boundary step from ``s`` to ``t``."""
        prev = self.prev
        if (
            self.extrapolate
            and t.lam == math.inf
            and prev is not None
            and prev[1].ksigma > s.ksigma
        ):
            s0, s1 = s.ksigma**2, prev[1].ksigma ** 2
            return x0.add(x0 - prev[0], alpha=s0 / (s1 - s0))
        return boundary_update(x, x0, s, t)

    def remember(self, x0: Tensor, s: Knot) -> None:
        """The data prediction at the start of the step just taken."""
        self.prev = (x0, s)


class StepSizeController:
    """Integrates one grid interval with an adaptive solver's error control
    (DPM-Solver-12/23, Sec. 4.2, Alg. 4): attempts are accepted when the scaled error is at
    most 1, and the next trial step comes from the solver's rule."""

    MAX_ATTEMPTS = 100_000

    def __init__(
        self, solver: AdaptiveSolver, evaluate: Evaluator, schedule: NoiseSchedule
    ) -> None:
        self.solver = solver
        self.evaluate = evaluate
        self.schedule = schedule

    def integrate(self, x: Tensor, x0: Tensor, s: Knot, end: Knot, index: int) -> Tensor:
        """From ``x`` at ``s`` (with ``x0 = D(x, s)``) to ``end``."""
        solver = self.solver
        direction = 1.0 if end.lam > s.lam else -1.0
        cur, x_prev = s, x
        h = solver.h_init
        m: Tensor | None = x0
        for _ in range(self.MAX_ATTEMPTS):
            if cur is end:
                return x
            remaining = abs(end.lam - cur.lam)
            nxt = end if h >= remaining else self.schedule.knot_at_lambda(cur.lam + direction * h)
            if m is None:
                m = self.evaluate(x, cur)
            ctx = StepContext(index, cur, nxt, solver.order, self.evaluate, self.schedule)
            x_high, x_low = solver.attempt(ctx, x, m)
            err = solver.error(x_high, x_low, x_prev)
            if not math.isfinite(err):
                raise NonFiniteError(index, nxt.t, nxt.sigma, list(range(x.shape[0])))
            if err <= 1.0:
                x_prev, x, cur, m = x_low, x_high, nxt, None
            h = solver.next_h(h, err, abs(end.lam - cur.lam))
            if cur is not end and h < 1e-10:
                raise RuntimeError(
                    f"adaptive step size collapsed at t={cur.t:.6g}; loosen rtol/atol"
                )
        raise RuntimeError(f"adaptive solver did not finish in {self.MAX_ATTEMPTS} attempts")


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------


def solve(
    denoiser: Denoiser,
    x: Tensor,
    grid: TimeGrid | Plan,
    solver: Solver | None = None,
    *,
    orders: list[int] | None = None,
    lower_order_final: bool | None = None,
    noise_sampler: NoiseSampler | None = None,
    xt_corrector: Callable[[Tensor, Knot, int], Tensor] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
    return_intermediates: bool = False,
    check_finite: CheckFinite = "end",
    final_step: FinalStepKind = "denoise",
    step_limit: StepHook | None = None,
    compensation: tuple[float, ...] | None = None,
    correction: Sequence[Sequence[float]] | Correction | None = None,
    grad: bool = False,
    start: Knot | None = None,
) -> SampleResult:
    """Run ``solver`` over ``grid`` starting from the state ``x`` at ``grid.knots[0]``
    (or at ``start``).

    Args:
        denoiser: ``x0_hat = denoiser(x, knot)``.
        x: initial state (any float dtype; solver arithmetic runs in at least float32).
        grid: the time grid, or a ready :class:`~dpmsolver.plan.Plan` (then ``solver``,
            ``orders`` and ``lower_order_final`` come from it).
        solver: a :class:`~dpmsolver.solvers.Solver`.
        orders: order per grid step (default: :func:`dpmsolver.plan.make_plan`'s).
        lower_order_final: lower the order of the last steps (default: when fewer than 15
            steps, as diffusers does).
        noise_sampler: ``noise_sampler(x, s, t) -> standard normal like x`` for the
            interval from knot ``s`` to ``t`` (stochastic solvers; :mod:`dpmsolver.noise`).
        xt_corrector: ``xt_corrector(x, knot, step) -> x`` applied after each step.
        callback: called with a :class:`StepInfo` after each step.
        progress: show a progress bar (default False).
        return_intermediates: keep every state and data prediction (memory grows).
        check_finite: ``"end"`` (default; one host sync at the end), ``"step"`` (stop at
            the first bad step) or ``"off"``. A NaN/Inf raises :class:`NonFiniteError`.
        final_step: the step into sigma = 0, ``"denoise"`` (default) or ``"extrapolate"``
            (:class:`FinalStep`).
        step_limit: per sample, hold each solver step within this bound of the
            first-order step (:class:`~dpmsolver.steplimit.StepLimit`; deterministic
            fixed-step solvers only, the boundary steps are first order anyway).
        compensation: one ratio per step after the first: the solver receives the data
            prediction extrapolated from the previous step's by that ratio
            (:class:`~dpmsolver.compensation.Compensation`; a tuned profile's stage (f)).
        correction: one tuple of coordinates per step: the solver receives the data
            prediction corrected in the trajectory's principal directions
            (:class:`~dpmsolver.correction.Correction`, PAS; a tuned profile's stage (g)),
            after any compensation; or a ready ``Correction`` for this run's start.
        grad: keep autograd on, for gradients through the solver (default False: sampling
            runs under ``torch.no_grad()``, as diffusers and k-diffusion pipelines do, so a
            run keeps no graph; classifier guidance still takes its gradient).
        start: the knot ``x`` is drawn at, where the grid begins after it: the pure-noise
            knot of a grid that starts a thousandth later
            (:attr:`~dpmsolver.timegrid.TimeGrid.pure_noise_entry`). The first evaluation,
            made on ``x`` at the first knot, then also carries ``x`` there by the
            first-order data-prediction step (DDIM, exact for a data prediction constant
            over the interval; out of pure noise ``x_t = sigma_t x + alpha_t x0_hat``),
            at no evaluation. Placing the noise at the first knot as it is leaves out
            ``alpha_t (x0_hat - x)``, a bias no budget removes: on the iso8-flow mixture at
            guidance 3, UniPC's error stayed at 1.0e-3-1.1e-3 from 20 to 80 NFE that way,
            and falls to 8.9e-5 at 80 with the step (``benchmarks/flow_entry.md``). None
            (default): ``x`` is at the first knot.
    """
    plan = _checked_plan(x, grid, solver, orders, lower_order_final, noise_sampler)
    solver, schedule = plan.solver, plan.grid.schedule
    in_dtype = x.dtype
    work = torch.promote_types(x.dtype, torch.float32)
    x = x.to(work)
    evaluate = Evaluator(denoiser, work)
    monitor = FiniteMonitor(check_finite, plan.grid.knots)
    recorder = Recorder(return_intermediates, callback)
    final = FinalStep(final_step, solver)
    controller = (
        StepSizeController(solver, evaluate, schedule)
        if isinstance(solver, AdaptiveSolver)
        else None
    )
    state = solver.init_state()
    limit = None if solver.stochastic else step_limit
    if compensation is not None and controller is not None:
        raise ValueError("compensation needs a fixed plan; adaptive solvers choose their own steps")
    comp = None if compensation is None else Compensation(compensation, len(plan.steps))
    corr = _correction(correction, plan, controller, x)
    entry = _entry(start, plan)

    def advance(step: PlannedStep, x: Tensor, state: Any, x0: Tensor) -> tuple[Tensor, Any]:
        """The step's end (and the solver's new state) from the prediction ``x0``; pure, so
        a correction's fit may call it for several predictions."""
        if step.boundary:
            return final.take(x, x0, step.s, step.t), state
        if controller is not None:
            return controller.integrate(x, x0, step.s, step.t, step.index), state
        noise = None if noise_sampler is None else _bind(noise_sampler, x)
        ctx = StepContext(step.index, step.s, step.t, step.order, evaluate, schedule, noise)
        x_next, new_state = solver.step(ctx, x, x0, state)
        if limit is not None:
            x_next = limit.apply(x, x0, x_next, step.s, step.t, step.index)
        return x_next, new_state

    with torch.set_grad_enabled(grad), Progress(len(plan.steps), enabled=progress) as bar:
        for step in plan.steps:
            x0 = evaluate(x, step.s)
            if entry is not None:
                # x0_hat barely depends on x here (alpha_s is a thousandth), so the
                # evaluation at the undisplaced state serves the displaced one
                x, entry = first_order_step(Form.DATA, x, x0, x0, entry, step.s), None
            if comp is not None:
                x0 = comp(x0, step.index)
            if corr is not None:
                x0 = corr(x0, step.index, functools.partial(_end, advance, step, x, state))
            x_next, state = advance(step, x, state, x0)
            if xt_corrector is not None and not math.isinf(step.t.lam):
                x_next = xt_corrector(x_next, step.t, step.index)
            monitor.record(step.index, x_next)
            recorder.record(step, x_next, x0, evaluate.nfe)
            final.remember(x0, step.s)
            x = x_next
            bar.update()
    out = x.to(in_dtype)
    monitor.finish(out)
    return SampleResult(
        x=out,
        nfe=evaluate.nfe,
        planned_nfe=plan.nfe,
        grid=plan.grid,
        orders=plan.orders,
        trajectory=recorder.trajectory,
        denoised=recorder.denoised,
    )


def _end(
    advance: Callable[[PlannedStep, Tensor, Any, Tensor], tuple[Tensor, Any]],
    step: PlannedStep,
    x: Tensor,
    state: Any,
    x0: Tensor,
) -> Tensor:
    return advance(step, x, state, x0)[0]


def _entry(start: Knot | None, plan: Plan) -> Knot | None:
    """``start`` where it lies before the grid's first knot (None where it is that knot)."""
    if start is None:
        return None
    first = plan.grid.knots[0]
    if start.lam == first.lam:
        return None
    if plan.grid.is_inversion or start.lam > first.lam:
        raise ValueError(
            f"start: a sampling run's start must be noisier than its grid's first knot "
            f"(t={first.t:.6g}), got t={start.t:.6g}"
        )
    return start


def _correction(
    correction: Sequence[Sequence[float]] | Correction | None,
    plan: Plan,
    controller: StepSizeController | None,
    x: Tensor,
) -> Correction | None:
    """The run's :class:`~dpmsolver.correction.Correction` (None for none)."""
    if correction is None:
        return None
    if controller is not None or plan.solver.stochastic:
        raise ValueError(
            "correction needs a fixed plan and a deterministic solver (adaptive solvers "
            "choose their own steps; a stochastic step is not affine in the prediction)"
        )
    if isinstance(correction, Correction):
        return correction
    return Correction(correction, len(plan.steps), x)


def _checked_plan(
    x: Tensor,
    grid: TimeGrid | Plan,
    solver: Solver | None,
    orders: list[int] | None,
    lower_order_final: bool | None,
    noise_sampler: NoiseSampler | None,
) -> Plan:
    """The plan :func:`solve` runs, after checking its inputs."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if isinstance(grid, Plan):
        plan = grid
    elif solver is None:
        raise TypeError("solve() needs a solver when given a grid")
    else:
        plan = make_plan(solver, grid, orders, lower_order_final=lower_order_final)
    if plan.solver.stochastic and noise_sampler is None:
        raise ValueError(f"{type(plan.solver).__name__} is stochastic: pass noise_sampler")
    return plan


def _bind(noise_sampler: NoiseSampler, x: Tensor) -> Callable[[Knot, Knot], Tensor]:
    return lambda a, b: noise_sampler(x, a, b)
