"""Time grids: where to step.

A :class:`TimeGrid` is a tuple of resolved :class:`~dpmsolver.schedules.Knot` s, strictly
monotone in ``lambda``: increasing for sampling, decreasing for inversion. The end of
sampling is explicit: ``final="zero"`` appends the clean knot ``sigma = 0`` (the last step
is then the data-prediction step ``x = x0_hat``); ``final="t_min"`` stops at ``t_end``.

Spacings (``steps`` intervals between ``t_start`` and ``t_end``):

- ``logsnr``: uniform in lambda (DPM-Solver, Sec. 3.3; recommended). ``exponential`` is
  the same grid under k-diffusion's name (uniform in log sigma~ = -lambda).
- ``time_uniform``: uniform in ``t`` (DDIM; SD3 with the flow schedule's shift).
- ``time_quadratic``: uniform in ``sqrt(t)`` (DDIM's "quad" for low-resolution data).
- ``karras``: uniform in ``sigma~^(1/rho)``, ``rho = 7`` (EDM, Eq. 5).
- ``polyexponential``: k-diffusion's ``ramp^rho`` in log sigma~ (``rho = 1`` is ``logsnr``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ._validate import check_choice, check_finite_float, check_int
from .schedules import Knot, NoiseSchedule, RectifiedFlowSchedule

__all__ = [
    "GRID_KINDS",
    "LEVEL_SPACED_KINDS",
    "GridKind",
    "TimeGrid",
    "default_grid",
    "grid_from_sigmas",
    "grid_from_timesteps",
    "make_grid",
    "shift_model_times",
]

GridKind = Literal[
    "logsnr", "exponential", "time_uniform", "time_quadratic", "karras", "polyexponential"
]
#: The kinds spaced in noise level (the others are spaced in time); ``sigma_max`` applies
#: to these only (:func:`make_grid`).
LEVEL_SPACED_KINDS: tuple[GridKind, ...] = ("logsnr", "exponential", "karras", "polyexponential")
GRID_KINDS: tuple[GridKind, ...] = (
    "logsnr",
    "exponential",
    "time_uniform",
    "time_quadratic",
    "karras",
    "polyexponential",
)
Final = Literal["zero", "t_min"]


@dataclass(frozen=True)
class TimeGrid:
    """Resolved knots of one sampling (or inversion) run on ``schedule``."""

    knots: tuple[Knot, ...]
    schedule: NoiseSchedule = field(compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.knots) < 2:
            raise ValueError("a time grid needs at least 2 knots (1 step)")
        lams = [k.lam for k in self.knots]
        if any(math.isnan(v) for v in lams):
            raise ValueError("time grid contains NaN noise levels")
        inc = all(b > a for a, b in itertools.pairwise(lams))
        dec = all(b < a for a, b in itertools.pairwise(lams))
        if not (inc or dec):
            raise ValueError(
                "time grid must be strictly monotone in noise level (no repeated or "
                "out-of-order times); got lambdas " + ", ".join(f"{v:.4g}" for v in lams)
            )
        if dec and any(math.isinf(v) for v in lams):
            raise ValueError(
                "an inversion grid (noise increasing) cannot start at sigma = 0 or end at pure "
                "noise"
            )

    @property
    def steps(self) -> int:
        """Number of steps (intervals)."""
        return len(self.knots) - 1

    @property
    def final_zero(self) -> bool:
        """True if the grid ends at ``sigma = 0`` with a data-prediction step."""
        return self.knots[-1].lam == math.inf

    @property
    def is_inversion(self) -> bool:
        """True if noise increases along the grid (data -> noise)."""
        return self.knots[-1].lam < self.knots[0].lam

    @property
    def times(self) -> list[float]:
        """Schedule times of the knots."""
        return [k.t for k in self.knots]

    @property
    def ksigmas(self) -> list[float]:
        """k-diffusion sigmas ``sigma / alpha`` of the knots (0 for the clean end)."""
        return [0.0 if k.lam == math.inf else k.ksigma for k in self.knots]

    def reversed(self) -> TimeGrid:
        """The same knots in the opposite direction (for inversion)."""
        return TimeGrid(tuple(reversed(self.knots)), self.schedule)

    @property
    def pure_noise_entry(self) -> Knot | None:
        """The pure-noise knot (``alpha = 0``, rectified flow at ``t_max``) where a sampling
        grid on a schedule that starts there begins after it, as the default grids do
        (:data:`PURE_NOISE_OFFSET`); None otherwise. A run from noise drawn there takes
        the step to the first knot with its first evaluation (:func:`dpmsolver.loop.solve`,
        ``start=``)."""
        sched = self.schedule
        if self.is_inversion or not sched.starts_at_pure_noise:
            return None
        start = sched.knot(sched.t_max)
        return start if self.knots[0].lam > start.lam else None


def default_grid(schedule: NoiseSchedule) -> GridKind:
    """The spacing a schedule family's users expect, and the default of every recipe:
    uniform in (shifted) time for rectified flow, as SD3, Flux and diffusers' flow
    schedulers step; uniform in log-SNR otherwise (DPM-Solver, Sec. 3.3)."""
    return "time_uniform" if isinstance(schedule, RectifiedFlowSchedule) else "logsnr"


def _lambda_spaced(schedule: NoiseSchedule, lams: Tensor) -> list[Knot]:
    ts = schedule.t_of_lambda(lams)
    return [
        Knot(t=k.t, lam=float(lam), alpha=k.alpha, sigma=k.sigma, model_t=k.model_t)
        for lam, k in zip(lams.tolist(), (schedule.knot(float(t)) for t in ts), strict=True)
    ]


def _time_spaced(
    schedule: NoiseSchedule, n: int, kind: str, ts: float, te: float, *, to_zero: bool
) -> list[Knot]:
    """``n`` knots spaced uniformly in ``t`` (or ``sqrt(t)``) from ``ts`` to ``te``. With
    ``to_zero`` (a final step to sigma = 0 and no explicit end) the spacing runs to the
    clean end ``t = 0`` instead and the last noisy knot is one spacing before it, as SD3,
    Flux, DDIM and diffusers space their steps: the final data-prediction step is then a
    step like the others, not the last of a series ending where the data prediction is
    nearly the state (at ``t_min``) after one outsized step. Where that knot would fall
    below ``t_min`` (very many steps), the grid ends at ``te`` as without ``to_zero``."""

    def spaced(a: float, b: float, count: int) -> Tensor:
        if kind == "time_uniform":
            return torch.linspace(a, b, count, dtype=torch.float64)
        return torch.linspace(math.sqrt(a), math.sqrt(b), count, dtype=torch.float64) ** 2

    ks, ke = schedule.knot(ts), schedule.knot(te)
    if to_zero:
        tgrid = spaced(ts, 0.0, n + 1)[:-1]
        if float(tgrid[-1]) >= schedule.t_min:
            return [ks] + [schedule.knot(float(t)) for t in tgrid[1:]]
    tgrid = spaced(ts, te, n)
    return [ks] + [schedule.knot(float(t)) for t in tgrid[1:-1]] + ([ke] if n > 1 else [])


def _level_spaced(
    schedule: NoiseSchedule, n: int, kind: str, ts: float, te: float, rho: float | None
) -> list[Knot]:
    """``n`` knots from ``ts`` to ``te`` spaced in noise level (log-SNR, Karras,
    polyexponential)."""
    ks, ke = schedule.knot(ts), schedule.knot(te)
    l0, l1 = ks.lam, ke.lam
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    if kind in ("logsnr", "exponential"):
        lams = l0 + ramp * (l1 - l0)
    elif kind == "karras":
        r = check_finite_float("rho", 7.0 if rho is None else rho, positive=True)
        smax, smin = math.exp(-l0 / r), math.exp(-l1 / r)  # sigma~^(1/rho)
        lams = -r * torch.log(smax + ramp * (smin - smax))
    else:
        r = check_finite_float("rho", 1.0 if rho is None else rho, positive=True)
        lams = l1 + (1.0 - ramp) ** r * (l0 - l1)
    return [ks] + _lambda_spaced(schedule, lams[1:-1]) + ([ke] if n > 1 else [])


#: Where a default grid starts on a schedule that starts at pure noise: this fraction of
#: the time range in (:func:`make_grid`). The run's noise is still drawn at pure noise and
#: carried here by the first evaluation (:attr:`TimeGrid.pure_noise_entry`).
PURE_NOISE_OFFSET = 1e-3


def make_grid(
    schedule: NoiseSchedule,
    steps: int,
    kind: GridKind = "logsnr",
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    final: Final = "zero",
    rho: float | None = None,
    sigma_max: float | None = None,
) -> TimeGrid:
    """Build a sampling grid of ``steps`` steps from ``t_start`` (noisy) to the end.

    Args:
        schedule: the noise schedule.
        steps: number of steps (>= 1).
        kind: spacing, one of :data:`GRID_KINDS` (default ``"logsnr"``).
        t_start: first time (default ``schedule.t_max``; on a schedule that starts at pure
            noise, :data:`PURE_NOISE_OFFSET` of the range after it; pass ``t_max`` to start
            at pure noise).
        t_end: last noisy time (default ``schedule.t_min``; for time-spaced grids ending
            with the step to sigma = 0, one spacing before ``t = 0``: see
            :func:`_time_spaced`).
        final: ``"zero"`` (default) adds a last step ``t_end -> sigma = 0``, so ``steps - 1``
            intervals lie between ``t_start`` and ``t_end``; ``"t_min"`` stops at ``t_end``.

    A grid spaced in noise level that starts at pure noise (rectified flow at ``t = 1``)
    takes a first-order step to the first knot of the time-uniform grid and is spaced in
    noise level from there.
        rho: exponent for ``karras`` (default 7) and ``polyexponential`` (default 1).
        sigma_max: for the grids spaced in noise level, the k-diffusion sigma (sigma/alpha)
            where the spacing starts (EDM's ``sigma_max``, 80 in Karras et al. 2022,
            Table 1): a start noisier than that takes one step to it first, as
            k-diffusion's samplers do on flow models entered at 80. None (default): the
            spacing starts at the start. Ignored by the time-spaced grids.
    """
    steps = check_int("steps", steps, minimum=1)
    check_choice("grid", kind, GRID_KINDS)
    check_choice("final", final, ("zero", "t_min"))
    if sigma_max is not None:
        sigma_max = check_finite_float("sigma_max", sigma_max, positive=True)
    ts = schedule.check_time("t_start", schedule.t_max if t_start is None else t_start)
    te = schedule.check_time("t_end", schedule.t_min if t_end is None else t_end)
    if not ts > te:
        raise ValueError(f"t_start={ts} must be greater than t_end={te}")
    if t_start is None and math.isinf(schedule.knot(ts).lam):
        # From pure noise (rectified flow at t = 1) the data prediction is only the mean, and
        # a multistep solver's first slope spans an infinite log-SNR step, so its second
        # step is first order too; starting a thousandth of the range in, as diffusers'
        # flow multistep schedulers do (1 - 1/1000), keeps it second order (measured on
        # the flow digits model: 13% lower error at 10 NFE; benchmarks/flow.md).
        ts = ts - (ts - te) * PURE_NOISE_OFFSET
    n = steps if final == "zero" else steps + 1  # noisy knots
    if kind not in LEVEL_SPACED_KINDS:
        knots = _time_spaced(schedule, n, kind, ts, te, to_zero=final == "zero" and t_end is None)
    else:
        ks = schedule.knot(ts)
        t1: float | None = None  # where the spacing starts after a first step, if it does
        if sigma_max is not None and n > 1 and ks.lam < -math.log(sigma_max):
            t1 = min(max(schedule.knot_at_lambda(-math.log(sigma_max)).t, te), ts)
        elif math.isinf(ks.lam) and n > 1:
            # Out of pure noise only a first-order step is defined: to the first knot a
            # time-uniform grid would take, then the spacing in noise level from there.
            t1 = ts + (te - ts) / (n - 1)
        if t1 is None:
            knots = _level_spaced(schedule, n, kind, ts, te, rho)
        else:
            knots = [ks, *_level_spaced(schedule, n - 1, kind, t1, te, rho)]
    if final == "zero":
        knots.append(schedule.zero_knot())
    return TimeGrid(tuple(knots), schedule)


def grid_from_timesteps(
    schedule: NoiseSchedule, timesteps: Sequence[float] | Tensor, *, final: Final = "t_min"
) -> TimeGrid:
    """A grid through user-given schedule times (decreasing to sample, increasing to
    invert); ``final="zero"`` appends the clean knot."""
    vals = [float(v) for v in torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()]
    check_choice("final", final, ("zero", "t_min"))
    knots = [schedule.knot(schedule.check_time(f"timesteps[{i}]", v)) for i, v in enumerate(vals)]
    if final == "zero":
        knots.append(schedule.zero_knot())
    return TimeGrid(tuple(knots), schedule)


SigmaConvention = Literal["family", "k"]


def grid_from_sigmas(
    schedule: NoiseSchedule,
    sigmas: Sequence[float] | Tensor,
    *,
    convention: SigmaConvention = "family",
) -> TimeGrid:
    """A grid through user-given noise levels, decreasing to sample (a trailing 0 is the
    clean knot).

    Args:
        schedule: the schedule.
        sigmas: the noise levels.
        convention: ``"family"`` (default): the sigma each family's tools show, the flow
            sigma ``sigma_t`` (in ``(0, 1]``) on a rectified-flow schedule, as diffusers'
            flow schedulers list it, and k-diffusion's ``sigma / alpha`` elsewhere (what
            k-diffusion and diffusers' VP schedulers list; VE sigma itself). ``"k"``:
            k-diffusion's ``sigma / alpha`` on every schedule.

    A value that cannot belong to the schedule (outside its range of noise levels) is a
    ValueError naming it and the range.
    """
    check_choice("convention", convention, ("family", "k"))
    flow = convention == "family" and isinstance(schedule, RectifiedFlowSchedule)
    vals = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()]
    first, last = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    if flow:
        lo, hi, what = last.sigma, first.sigma, "flow sigma"
    else:
        lo, hi, what = last.ksigma, first.ksigma, "sigma (k-diffusion's sigma/alpha)"
    knots: list[Knot] = []
    for i, v in enumerate(vals):
        if not math.isfinite(v) and not (v == math.inf and hi == math.inf):
            raise ValueError(f"sigmas[{i}]={v} must be finite")
        if v == 0.0:
            if i != len(vals) - 1:
                raise ValueError("sigma 0 may only be the last entry of sigmas")
            knots.append(schedule.zero_knot())
            continue
        # float32 copies of the schedule's own levels (diffusers lists them so) belong to it
        if not (lo * (1 - 1e-6) <= v <= hi * (1 + 1e-6)):
            raise ValueError(
                f"sigmas[{i}]={v:g} is outside this schedule's {what} range "
                f"[{lo:g}, {hi:g}] ({type(schedule).__name__})"
            )
        v = min(max(v, lo), hi)
        if flow:
            lam = math.log((1.0 - v) / v) if v < 1.0 else -math.inf
            knots.append(first if v >= 1.0 else schedule.knot_at_lambda(lam))
        else:
            knots.append(first if v == hi else schedule.knot_at_lambda(-math.log(v)))
    return TimeGrid(tuple(knots), schedule)


def shift_model_times(grid: TimeGrid, shifts: Sequence[float]) -> TimeGrid:
    """``grid`` with the time the network is told at each noisy knot moved to that of
    log-SNR ``lambda + shift`` (clamped to the schedule's range), while the solver still
    steps between the knots themselves: the decoupled time of LD3 (Tong et al., "Learning
    to Discretize Denoising Diffusion ODEs", 2024, Sec. 3), a per-step correction of the
    discretization error that costs no evaluation. ``shifts`` has one entry per noisy knot
    (``sigma > 0``), first to last; a pure-noise knot (``lambda = -inf``) takes 0."""
    noisy = [i for i, k in enumerate(grid.knots) if k.sigma > 0]
    if len(shifts) != len(noisy):
        raise ValueError(
            f"model_shifts: one per noisy knot, i.e. {len(noisy)} for this grid, got {len(shifts)}"
        )
    sched = grid.schedule
    lo = sched.knot(sched.t_max).lam
    hi = sched.knot(sched.t_min).lam
    knots = list(grid.knots)
    for n, (i, d) in enumerate(zip(noisy, shifts, strict=True)):
        d = check_finite_float(f"model_shifts[{n}]", d)
        k = knots[i]
        if d == 0.0:
            continue
        if math.isinf(k.lam):
            raise ValueError(
                f"model_shifts[{n}]={d}: the knot is pure noise (lambda = -inf), where the "
                "network's time cannot move; use 0"
            )
        lam = min(max(k.lam + d, lo), hi)
        knots[i] = dataclasses.replace(k, model_t=sched.knot_at_lambda(lam).model_t)
    return TimeGrid(tuple(knots), sched)
