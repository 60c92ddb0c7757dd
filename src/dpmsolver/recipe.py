"""A complete solver configuration, and the named policies that choose one.

A :class:`Recipe` is everything about *how* to integrate, apart from the model: the solver
and its options, the time grid and where it ends, and how the last step is taken
(the counterpart of a diffusers scheduler config). :meth:`Recipe.plan` turns it, a
schedule and a budget into a :class:`~dpmsolver.plan.Plan`.

A *policy* turns a request (budget, guidance scale, schedule) into a recipe; ``"auto"``
is one (:mod:`dpmsolver.auto` registers it). :func:`resolve` is what
:func:`dpmsolver.sample` calls with its ``solver`` argument, so sampling does not depend on
any policy's table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor

from ._validate import check_choice, check_int
from .compensation import check_compensation
from .correction import check_correction
from .guidance import check_norm_cap
from .loop import FinalStepKind
from .plan import Plan, make_plan, solver_orders
from .schedules import NoiseSchedule, RectifiedFlowSchedule
from .solvers import AdaptiveSolver, Solver, get_solver
from .steplimit import StepLimit, check_step_envelope, check_step_limit
from .timegrid import (
    GRID_KINDS,
    Final,
    GridKind,
    TimeGrid,
    default_grid,
    grid_from_sigmas,
    grid_from_timesteps,
    make_grid,
    shift_model_times,
)

__all__ = [
    "POLICIES",
    "Policy",
    "PolicyRequest",
    "Recipe",
    "RecipeSource",
    "default_solver",
    "register_policy",
    "resolve",
]

DEFAULT_STEPS = 20


@dataclass(frozen=True)
class Recipe:
    """A complete sampler configuration.

    Attributes:
        solver: registry name or alias.
        options: solver options (``order`` included).
        grid: time-grid kind (None: the schedule family's,
            :func:`~dpmsolver.timegrid.default_grid`); ``rho`` its exponent where it has one.
        sigma_max: k-diffusion sigma where a grid spaced in noise level starts its spacing
            after a first step from a noisier start (:func:`~dpmsolver.timegrid.make_grid`),
            or None.
        sigma_end: k-diffusion sigma (sigma/alpha) of the last noisy knot, or None for
            ``t_end`` / the schedule's ``t_min``; stopping earlier pays off when
            evaluations are scarce.
        final_step: ``"denoise"`` or ``"extrapolate"`` (see :class:`dpmsolver.loop.FinalStep`).
        t_start: first time (default: the schedule's ``t_max``).
        t_end: last noisy time (default: ``sigma_end``, else the schedule's ``t_min``).
        final: ``"zero"`` (default) ends with the data-prediction step to sigma = 0;
            ``"t_min"`` stops at the last noisy knot.
        lower_order_final: lower the last orders (default: below 15 steps).
        timesteps: fixed noisy knots (schedule times, first to last) instead of a grid
            kind; the recipe then spends what its solver plans for them (a tuned profile's
            knots, :mod:`dpmsolver.tune`).
        model_shifts: per noisy knot, first to last, a log-SNR offset of the time the
            network is told there, while the solver steps from the knot itself (LD3's
            decoupled time; :func:`~dpmsolver.timegrid.shift_model_times`; a tuned
            profile's stage (c)). None: the knots' own times.
        x0_norm_cap: ``(lambda, cap)`` knots of a per-sample bound on the data
            prediction's norm (:class:`~dpmsolver.guidance.NormCap`; a tuned profile's,
            measured on its pilot), or None for no bound.
        step_limit: per sample, hold each step's departure from the first-order step within
            this factor of the first-order displacement
            (:class:`~dpmsolver.steplimit.StepLimit`; a tuned profile's), or None.
        compensation: one ratio per step after the first, extrapolating the data prediction
            from the previous step's (:class:`~dpmsolver.compensation.Compensation`; a
            tuned profile's stage (f)), or None.
        correction: one tuple of coordinates per step correcting the data prediction in
            the trajectory's principal directions (:class:`~dpmsolver.correction.Correction`,
            PAS; a tuned profile's stage (g)), or None.
        orders: the order of each step, first to last, in place of the solver's plan
            (USF's per-step solver strategy, Liu et al. 2024, for the order alone; a tuned
            profile's stage (h)): each at most the planned order, so that a multistep step
            keeps its one evaluation and the history it needs; None: the plan's.
        step_envelope: per step, first to last, the largest correction norm
            ``||x_t - x1||`` a sample may make beyond the first-order step (0: no bound
            there; :class:`~dpmsolver.steplimit.StepLimit`'s envelope; a tuned profile's,
            :attr:`dpmsolver.tune.TuneOptions.envelope_margin`), or None.
        envelope_persistence: the envelope binds on a sample once it has been over it at
            this many consecutive steps, and from then on (1: wherever it is over;
            :class:`~dpmsolver.steplimit.StepLimit`'s ``persistence``).
    """

    solver: str = "dpmpp_2m"
    options: Mapping[str, Any] = field(default_factory=dict)
    grid: GridKind | None = None
    rho: float | None = None
    sigma_end: float | None = None
    final_step: FinalStepKind = "denoise"
    t_start: float | None = None
    t_end: float | None = None
    final: Final = "zero"
    lower_order_final: bool | None = None
    timesteps: tuple[float, ...] | None = None
    model_shifts: tuple[float, ...] | None = None
    x0_norm_cap: tuple[tuple[float, float], ...] | None = None
    step_limit: float | None = None
    compensation: tuple[float, ...] | None = None
    correction: tuple[tuple[float, ...], ...] | None = None
    # last, so that positional arguments keep their meaning from before it existed
    sigma_max: float | None = None
    orders: tuple[int, ...] | None = None
    step_envelope: tuple[float, ...] | None = None
    envelope_persistence: int = 1

    def __post_init__(self) -> None:
        # frozen: a list given is kept as the tuple a profile compares and hashes
        object.__setattr__(self, "compensation", check_compensation(self.compensation))
        object.__setattr__(self, "correction", check_correction(self.correction))
        if self.x0_norm_cap is not None:
            check_norm_cap(self.x0_norm_cap)
        check_step_limit(self.step_limit)
        object.__setattr__(self, "step_envelope", check_step_envelope(self.step_envelope))
        check_int("envelope_persistence", self.envelope_persistence, minimum=1)
        if self.grid is not None:
            check_choice("grid", self.grid, GRID_KINDS)
        check_choice("final", self.final, ("zero", "t_min"))
        check_choice("final_step", self.final_step, ("denoise", "extrapolate"))
        if self.t_end is not None and self.sigma_end is not None:
            raise ValueError("give at most one of t_end and sigma_end")
        if self.orders is not None:
            if isinstance(self.orders, (str, bytes)) or not hasattr(self.orders, "__iter__"):
                raise ValueError(f"orders must be a sequence of step orders, got {self.orders!r}")
            checked = (check_int(f"orders[{i}]", o, minimum=1) for i, o in enumerate(self.orders))
            object.__setattr__(self, "orders", tuple(checked))

    def build_solver(self) -> Solver:
        """The solver (``options`` may hold its ``order``)."""
        options = dict(self.options)
        return get_solver(self.solver, options.pop("order", None), **options)

    def end_time(self, schedule: NoiseSchedule) -> float | None:
        """The last noisy time on ``schedule``: ``t_end``, or ``sigma_end`` as a time
        (clamped to the schedule's range), or None for the schedule's own."""
        if self.t_end is not None or self.sigma_end is None:
            return self.t_end
        t = schedule.knot_at_lambda(-math.log(self.sigma_end)).t
        return min(max(t, schedule.t_min), schedule.t_max)

    def plan(
        self,
        schedule: NoiseSchedule,
        *,
        steps: int | None = None,
        nfe: int | None = None,
        timesteps: Sequence[float] | Tensor | None = None,
        sigmas: Sequence[float] | Tensor | None = None,
        solver: Solver | None = None,
    ) -> Plan:
        """The plan on ``schedule`` for ``steps`` grid steps or an ``nfe`` budget (default
        20 steps), or through custom ``timesteps`` (schedule times) / ``sigmas``
        (k-diffusion sigmas with an optional trailing 0). ``solver`` overrides the built one."""
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        solver = self.build_solver() if solver is None else solver
        if self.timesteps is not None:
            if timesteps is not None or sigmas is not None:
                raise ValueError("the recipe fixes its knots: do not pass timesteps or sigmas")
            timesteps = self.timesteps
        custom = timesteps is not None or sigmas is not None
        if timesteps is not None and sigmas is not None:
            raise ValueError("give at most one of timesteps and sigmas")
        if steps is not None and nfe is not None:
            raise ValueError("give at most one of steps and nfe")
        if steps is not None:
            check_int("steps", steps, minimum=1)
        if nfe is not None:
            check_int("nfe", nfe, minimum=1)
        ends = {"t_start": self.t_start, "t_end": self.end_time(schedule)}
        if isinstance(solver, AdaptiveSolver):
            if steps is not None or nfe is not None or custom or self.orders is not None:
                raise ValueError(
                    "adaptive solvers choose their own steps: do not pass steps, nfe, "
                    "timesteps, sigmas or orders (tune rtol/atol)"
                )
            g = make_grid(
                schedule, 2 if self.final == "zero" else 1, "logsnr", final=self.final, **ends
            )
            return make_plan(
                solver, g, solver_orders(solver, steps=g.steps, final_zero=g.final_zero)
            )
        grid: TimeGrid | None = None
        if custom:
            if steps is not None or nfe is not None:
                raise ValueError("steps/nfe are implied by timesteps/sigmas; do not pass both")
            if sigmas is not None:
                grid = grid_from_sigmas(schedule, sigmas)
            else:
                assert timesteps is not None
                grid = grid_from_timesteps(schedule, timesteps, final=self.final)
            steps = grid.steps
        if steps is None and nfe is None:
            steps = DEFAULT_STEPS
        final_zero = grid.final_zero if grid is not None else self.final == "zero"
        orders = solver_orders(
            solver,
            steps=steps,
            nfe=None if custom else nfe,
            final_zero=final_zero,
            lower_order_final=self.lower_order_final,
        )
        if self.orders is not None:
            orders = self._own_orders(orders)
        if grid is None:
            kind = self.grid if self.grid is not None else default_grid(schedule)
            grid = make_grid(
                schedule,
                len(orders),
                kind,
                final=self.final,
                rho=self.rho,
                sigma_max=self.sigma_max,
                **ends,
            )
        if self.model_shifts is not None:
            grid = shift_model_times(grid, self.model_shifts)
        return make_plan(solver, grid, orders)

    def _own_orders(self, planned: Sequence[int]) -> list[int]:
        """``orders`` checked against the plan's: as many steps, none above its order."""
        assert self.orders is not None
        if len(self.orders) != len(planned):
            raise ValueError(
                f"orders has {len(self.orders)} entries but the recipe plans {len(planned)} steps"
            )
        for i, (o, p) in enumerate(zip(self.orders, planned, strict=True)):
            if o > p:
                raise ValueError(f"orders[{i}]={o} exceeds the planned order {p} of that step")
        return list(self.orders)

    def step_limiter(self) -> StepLimit | None:
        """The :class:`~dpmsolver.steplimit.StepLimit` this recipe samples with (its
        ``step_limit``, ``step_envelope`` and ``envelope_persistence``), or None where it
        has neither bound."""
        if self.step_limit is None and self.step_envelope is None:
            return None
        return StepLimit(self.step_limit, self.step_envelope, self.envelope_persistence)

    def describe(self) -> str:
        """One line for logs and tables."""
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        extra = f" rho={self.rho}" if self.rho is not None else ""
        extra += f" sigma_max={self.sigma_max:g}" if self.sigma_max is not None else ""
        stop = f" sigma_end={self.sigma_end}" if self.sigma_end is not None else ""
        shifted = " model-time shifts" if self.model_shifts is not None else ""
        capped = " x0 norm cap" if self.x0_norm_cap is not None else ""
        limited = f" step limit {self.step_limit:g}" if self.step_limit is not None else ""
        limited += " step envelope" if self.step_envelope is not None else ""
        limited += " compensation" if self.compensation is not None else ""
        limited += " correction" if self.correction is not None else ""
        limited += f" orders={''.join(map(str, self.orders))}" if self.orders is not None else ""
        lof = f" lower_order_final={self.lower_order_final}" if self.lower_order_final else ""
        return (
            f"{self.solver}{opts}{lof} [{self.grid}{extra}]{stop} final={self.final_step}"
            f"{shifted}{capped}{limited}"
        )


# ----------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRequest:
    """What a policy may base its choice on.

    Attributes:
        nfe: the evaluation budget.
        guidance_scale: the classifier-free guidance scale (the largest, if per sample).
        schedule: the model's schedule.
    """

    nfe: int
    guidance_scale: float
    schedule: NoiseSchedule


Policy = Callable[[PolicyRequest], Recipe]


class RecipeSource(Protocol):
    """Recipes fitted to one model (:class:`dpmsolver.tune.Profile`): the recipe for a
    budget and guidance scale, checked against the schedule and prediction it was made
    for."""

    def recipe(
        self, nfe: int, guidance_scale: float, schedule: NoiseSchedule, prediction: str
    ) -> Recipe: ...


POLICIES: dict[str, Policy] = {}


def register_policy(name: str, policy: Policy) -> None:
    """Make ``solver=name`` resolve through ``policy``."""
    POLICIES[name] = policy


def default_solver(schedule: NoiseSchedule, guidance_scale: float = 1.0) -> str:
    """The solver :func:`dpmsolver.sample` runs when none is named: DPM-Solver++ 2M
    (``dpmpp_2m``; Lu et al. 2022b, Alg. 2), and on rectified flow below guidance 5 UniPC
    with B(h) = expm1(h) at order 2 (``unipc``: the same 2M predictor plus the UniC
    corrector, Zhao et al. 2023, Eq. 8, at no extra evaluation).

    Measured (benchmarks/flow.md, benchmarks/flow_mixtures.md): chosen on the flow digits
    network at guidance 1 and 3 (0.51-0.92x DPM-Solver++ 2M over 5-25 NFE), and checked on
    the suite's four exact flow mixtures, which the choice never saw: at guidance 1-3 it is
    0.77x 2M on the geometric mean; at 7.5-15 the corrector's extrapolation made a
    guided mixture diverge (up to 350x 2M's error), so strong guidance keeps 2M, as
    DPM-Solver-v3's official sampler turns its corrector off from guidance 5."""
    flow = isinstance(schedule, RectifiedFlowSchedule)
    return "unipc" if flow and guidance_scale < 5.0 else "dpmpp_2m"


def resolve(solver: str | Recipe | None, request: PolicyRequest) -> Recipe:
    """The recipe for ``solver``: a recipe as given, a policy's choice, a registry name, or
    for None the schedule's :func:`default_solver`."""
    if solver is None:
        return Recipe(default_solver(request.schedule, request.guidance_scale))
    if isinstance(solver, Recipe):
        return solver
    if solver in POLICIES:
        return POLICIES[solver](request)
    return Recipe(solver)
