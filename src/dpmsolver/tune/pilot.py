"""The pilot :func:`dpmsolver.tune` calibrates on: the exact reference solves, its rows,
the counted (and memoized) network, the blow-up guard and the boundary probes.

:class:`_Problem` is one guidance scale's pilot: the noises and their reference solutions
(Dormand-Prince, :func:`dpmsolver.analytic.reference_solve`, tightened until its own error
is 10x below the best candidate's), split into calibration (even) and held-out (odd) rows;
it runs a recipe on any rows and scores it (:class:`_Choice`). :class:`_Guard` runs a
choice from 512 noises of tune's own with no reference and counts samples that end beyond
twice the largest reference norm. :class:`_Envelope` records the data-prediction norms along
the reference solve for the profile's norm cap."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..analytic import reference_solve
from ..correction import CorrectionFit
from ..denoiser import Denoiser, Network
from ..guidance import NormCap
from ..loop import NonFiniteError, solve
from ..parameterization import Prediction
from ..plan import Plan
from ..recipe import Recipe
from ..sampling import SampleOptions, build_denoiser
from ..schedules import Knot, NoiseSchedule
from ..steplimit import StepHook, StepRatios
from ..timegrid import make_grid
from .comparison import _norms, _per_sample, _rms
from .options import CAP_BINS, GUARD_SEED


class _Counter:
    """Counts the sample rows the network evaluates (one counter per thread), and answers a
    call it has seen before from memory (:attr:`TuneOptions.memo_mb`).

    Many of tune's runs repeat a call exactly: every run of the same rows starts from the
    same states at the same time, the final-step variant of stage (e) and the walk-back of
    the tail check rerun a recipe whose evaluations are all the same, and a fit's runs that
    share their first knots share those evaluations. A call repeats only with the same rows,
    the same knot and bit-identical states, so the answer is the one the network gave (the
    same rows in the same call): the choices do not change, only the evaluations counted.
    """

    def __init__(self, denoiser: _RowDenoiser, memo_mb: int = 0) -> None:
        self.denoiser = denoiser
        self.rows = 0
        self.budget = memo_mb * 2**20
        self.held = 0
        self.memo: OrderedDict[tuple[Any, ...], tuple[Tensor, Tensor]] = OrderedDict()

    def __call__(self, x: Tensor, knot: Knot, rows: list[int] | None = None) -> Tensor:
        if self.budget <= 0:
            self.rows += x.shape[0]
            return self.denoiser(x, knot, rows)
        # the sum only buckets the states; equality is checked on the states themselves
        key = (None if rows is None else tuple(rows), knot, x.shape, float(x.sum()))
        seen = self.memo.get(key)
        if seen is not None and torch.equal(seen[0], x):
            self.memo.move_to_end(key)
            return seen[1].clone()  # the caller may update it in place
        self.rows += x.shape[0]
        out = self.denoiser(x, knot, rows)
        size = _nbytes((x, out))
        if size <= self.budget:
            if seen is not None:
                self.held -= _nbytes(self.memo.pop(key))
            self.memo[key] = (x.clone(), out.clone())
            self.held += size
            while self.held > self.budget:
                self.held -= _nbytes(self.memo.popitem(last=False)[1])
        return out


def _nbytes(pair: tuple[Tensor, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in pair) or 1


@dataclass
class _Problem:
    """One guidance scale's pilot: start states, reference, rows, and the trajectory."""

    denoiser: _Counter
    schedule: NoiseSchedule
    x_T: Tensor
    reference: Tensor
    cal: list[int]
    held: list[int]
    spread: float
    rtol: float
    ref_error: float
    fine: tuple[Knot, ...] = ()
    fine_rows: list[int] = field(default_factory=list)
    fine_x: list[Tensor] = field(default_factory=list)
    probes: _Probes | None = None
    guard: _Guard | None = None
    envelope: tuple[tuple[float, float], ...] = ()

    def norm_cap(self, factor: float | None) -> tuple[tuple[float, float], ...] | None:
        """The :class:`~dpmsolver.guidance.NormCap` knots at ``factor`` times the
        envelope (None for no factor or no envelope)."""
        if factor is None or not self.envelope:
            return None
        return tuple((lam, factor * v) for lam, v in self.envelope)

    def run(self, recipe: Recipe, nfe: int, rows: Sequence[int] | None = None) -> Tensor | None:
        """The recipe's final samples for ``rows`` (all if None); None if it cannot spend
        exactly ``nfe``."""
        if rows is None:
            return self.run_from(recipe, nfe, self.x_T, self.denoiser)
        return self.run_from(recipe, nfe, self.x_T[list(rows)], _Rows(self.denoiser, list(rows)))

    def plan(self, recipe: Recipe, nfe: int) -> Plan | None:
        """The recipe's plan for ``nfe`` evaluations (its fitted knots imply them), or None
        where it cannot spend exactly that."""
        try:
            plan = recipe.plan(self.schedule, nfe=None if recipe.timesteps else nfe)
        except ValueError:
            return None
        return plan if plan.nfe == nfe else None

    def run_from(
        self,
        recipe: Recipe,
        nfe: int,
        x_T: Tensor,
        den: Denoiser,
        fit: CorrectionFit | None = None,
        limit: StepHook | None = None,
    ) -> Tensor | None:
        """The recipe's final samples from ``x_T`` under ``den``; None if it cannot spend
        exactly ``nfe``. ``fit``: a stage (g) fit run in place of the recipe's correction;
        ``limit``: a step limit (or a :class:`~dpmsolver.steplimit.StepRatios` probe) run in
        place of the recipe's."""
        plan = self.plan(recipe, nfe)
        if plan is None:
            return None
        try:
            if limit is None:
                limit = recipe.step_limiter()
            return solve(
                den,
                x_T,
                plan,
                check_finite="off",
                final_step=recipe.final_step,
                step_limit=limit,
                compensation=recipe.compensation,
                correction=recipe.correction if fit is None else fit,
                start=plan.grid.pure_noise_entry,  # x_T is drawn at t_max, as sample() does
            ).x
        except NonFiniteError:  # pragma: no cover - check_finite="off" does not raise
            return None

    def step_ratios(
        self, recipe: Recipe, nfe: int, cap: tuple[tuple[float, float], ...] | None
    ) -> StepRatios | None:
        """How far ``recipe``'s steps depart from the first-order step on the pilot rows,
        run as a profile samples (under the norm cap ``cap`` and the recipe's own step
        limit; :attr:`TuneOptions.step_limit_margin`, :attr:`TuneOptions.envelope_margin`);
        None where it cannot run."""
        probe = StepRatios(recipe.step_limiter())
        den: Denoiser = self.denoiser if cap is None else NormCap(self.denoiser, cap)
        x = self.run_from(recipe, nfe, self.x_T, den, limit=probe)
        return None if x is None else probe

    def errors(self, x: Tensor | None, rows: Sequence[int]) -> Tensor:
        """Per-sample errors of the rows ``rows`` of a full-batch result ``x``."""
        if x is None:
            dev = self.reference.device
            return torch.full((len(rows),), math.inf, dtype=torch.float64, device=dev)
        return _per_sample(x[list(rows)], self.reference[list(rows)])


@dataclass
class _Guard:
    """The blow-up guard's start states, the pilot rows whose conditioning they take, and
    the RMS norm beyond which a sample has left the data (:attr:`TuneOptions.guard_rows`)."""

    x_T: Tensor
    rows: list[int]
    bound: float
    # the norm cap the guard's runs sample with (options.CAPPED_GUARD_RULES;
    # None: none)
    cap: tuple[tuple[float, float], ...] | None = None
    # the norm cap of the runs stage (a)'s tail estimate reads (TuneOptions.tail_accept_capped;
    # None: those runs are the ones above)
    accept_cap: tuple[tuple[float, float], ...] | None = None
    # each budget's runs until its choice is made (the tail ranking and the tail check
    # reuse them): budgets run in threads, each writes only its own entry. They are kept in
    # host memory: up to 8 runs of 512 samples a budget would otherwise stay on the device.
    runs: dict[int, dict[str, Tensor | None]] = field(default_factory=dict)
    references: dict[int, Tensor] = field(default_factory=dict)

    def samples(
        self, prob: _Problem, recipe: Recipe, nfe: int, accept: bool = False
    ) -> Tensor | None:
        """``recipe``'s samples from the guard's noises, on the CPU (None if it cannot
        run); ``accept``: the runs stage (a)'s tail estimate reads (under ``accept_cap``
        where set)."""
        runs = self.runs.setdefault(nfe, {})
        cap = self.accept_cap if accept and self.accept_cap is not None else self.cap
        # one tune call has one cap (TuneOptions.norm_cap), so whether a run has one keys it
        key = repr(recipe) + ("" if cap is None else "|capped")
        if key not in runs:
            den: Denoiser = _Rows(prob.denoiser, self.rows)
            if cap is not None:
                den = NormCap(den, cap)
            x = prob.run_from(recipe, nfe, self.x_T, den)
            runs[key] = None if x is None else x.cpu()
        return runs[key]

    def forget(self, nfe: int) -> None:
        """Drop budget ``nfe``'s runs (its choice is made)."""
        self.runs.pop(nfe, None)

    def runs_of(
        self, prob: _Problem, choices: Sequence[_Choice], accept: bool = False
    ) -> list[Tensor] | None:
        """Each choice's samples from the guard's noises (None if one cannot run;
        ``accept`` as in :meth:`samples`)."""
        xs = [self.samples(prob, c.recipe, c.nfe, accept) for c in choices]
        runs = [x for x in xs if x is not None]
        return runs if len(runs) == len(xs) else None

    def beyond(self, x: Tensor) -> Tensor:
        """Which of the guard samples ``x`` end beyond the bound (a NaN does)."""
        return ~(_norms(x) <= self.bound)

    def blowups(self, prob: _Problem, recipe: Recipe, nfe: int) -> int:
        """Guard samples of ``recipe`` beyond the bound (one more than all if it cannot
        run)."""
        x = self.samples(prob, recipe, nfe)
        if x is None:
            return len(self.rows) + 1
        return int(self.beyond(x).sum())

    def reference(self, prob: _Problem, rows: list[int]) -> Tensor:
        """The exact samples (at the pilot's tolerance) of the guard rows ``rows``."""
        from ..analytic import exact_sample

        todo = [i for i in rows if i not in self.references]
        if todo:
            den = _Rows(prob.denoiser, [self.rows[i] for i in todo])
            with torch.no_grad():
                ref = exact_sample(den, self.x_T[todo], prob.schedule, rtol=prob.rtol)
            for j, i in enumerate(todo):
                self.references[i] = ref[j]
        return torch.stack([self.references[i] for i in rows])


def _seeded_noise(seed: int, rows: int, like: Tensor) -> Tensor:
    """``rows`` standard-normal float64 noises shaped as ``like``'s rows, on its device,
    from ``seed``: drawn on the CPU, so that every device gets the same ones."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((rows, *like.shape[1:]), generator=g, dtype=torch.float64)
    return z.to(like.device)


def _make_guard(noise: Tensor, sigma: Any, ref: Tensor, rows: int, factor: float) -> _Guard:
    """``rows`` noises of :data:`GUARD_SEED` (:func:`_seeded_noise`) at the start's
    ``sigma``, as the pilot's."""
    largest = float(_norms(ref).max())
    pilot = noise.shape[0]
    z = _seeded_noise(GUARD_SEED, rows, noise)
    return _Guard(z * sigma, [i % pilot for i in range(rows)], factor * largest)


class _Envelope:
    """Passes evaluations through and records, per evaluation at a finite log-SNR, the
    largest L2 norm of the data predictions (:attr:`TuneOptions.norm_cap`)."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser
        self.seen: list[tuple[float, Tensor]] = []

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        out = self.denoiser(x, knot)
        if math.isfinite(knot.lam):
            norms = torch.linalg.vector_norm(out.double().flatten(1), dim=1)
            self.seen.append((knot.lam, norms.max()))
        return out

    def knots(self, bins: int = CAP_BINS) -> tuple[tuple[float, float], ...]:
        """``(lambda, norm)`` at the centres of ``bins`` equal log-SNR bins over the
        recorded range: each bin's largest recorded norm, widened to its neighbours' (an
        empty bin takes its nearest filled ones'); non-finite norms are ignored."""
        pairs = [(lam, float(v)) for lam, v in self.seen]
        pairs = [(lam, v) for lam, v in pairs if math.isfinite(v) and v > 0.0]
        if not pairs:
            return ()
        lo, hi = min(p[0] for p in pairs), max(p[0] for p in pairs)
        if hi <= lo:
            return ((lo, max(p[1] for p in pairs)),)
        width = (hi - lo) / bins
        most = [-math.inf] * bins
        for lam, v in pairs:
            j = min(int((lam - lo) / width), bins - 1)
            most[j] = max(most[j], v)
        filled = [j for j in range(bins) if most[j] > 0.0]
        full = []
        for j in range(bins):
            left = [most[i] for i in filled if i <= j][-1:]
            right = [most[i] for i in filled if i >= j][:1]
            full.append(max(left + right))
        wide = [max(full[max(j - 1, 0) : j + 2]) for j in range(bins)]
        return tuple((lo + (j + 0.5) * width, wide[j]) for j in range(bins))


class _Rows:
    """The denoiser restricted to some pilot rows (conditioning is per row)."""

    def __init__(self, denoiser: _Counter, rows: list[int]) -> None:
        self.denoiser, self.rows = denoiser, rows

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        return self.denoiser(x, knot, rows=self.rows)


@dataclass
class _Probes:
    """Start states bisected towards the mode boundaries between held-out pilot noises.

    A test sample near the boundary between two modes ends in the wrong mode under a
    solver whose own boundary lies elsewhere, and then carries most of the RMS error of a
    whole batch; 64 held-out rows rarely contain one. The probes put start states at known
    distances from the reference's boundary: for held-out pairs ``a, b`` the states
    ``cos(theta) a + sin(theta) b``, ``theta`` in ``[0, pi/2]`` (each distributed as a
    pilot noise, so the share of ``theta`` on which a solver and the reference disagree
    estimates the probability that a sample changes mode), bisected on the reference until
    the bracket holding its jump is ``2**-levels`` of the range.

    Attributes:
        x_T: the probes' start states (the bisection's midpoints, level by level).
        rows: the pilot row whose conditioning each probe takes (``a``'s).
        reference: the probes' reference samples.
        pair: each probe's pair.
        distance: each probe's distance from its pair's boundary, as a share of the range.
        jump: per pair, the per-sample distance between the reference samples on the two
            sides of the final bracket (a probe farther than half of it has changed mode).
        pairs: pairs examined (those with a jump and those without).
        resolution: the final bracket's width, as a share of the range (``2**-levels``).
    """

    x_T: Tensor
    rows: list[int]
    reference: Tensor
    pair: list[int]
    distance: list[float]
    jump: list[float]
    pairs: int
    resolution: float


def _probe_boundaries(
    den: _Counter,
    x_T: Tensor,
    ref: Tensor,
    held: list[int],
    schedule: NoiseSchedule,
    rtol: float,
    pairs: int,
    levels: int,
) -> _Probes | None:
    """:class:`_Probes` from the ``pairs`` held-out pairs (consecutive held-out rows) whose
    ends are farthest apart, bisected ``levels`` times; None if no pair has a jump (one
    that a bisection halving the bracket does not shrink: a mode boundary, where a smooth
    change would shrink with the bracket)."""
    from ..analytic import exact_sample

    n = len(held) // 2
    if n == 0 or pairs == 0:
        return None
    a_all, b_all = held[0 : 2 * n : 2], held[1 : 2 * n : 2]
    # b's end under a's conditioning: the whole arc has a's
    ends = exact_sample(_Rows(den, a_all), x_T[b_all], schedule, rtol=rtol)
    gap = _per_sample(ref[a_all], ends)
    pick = sorted(range(n), key=lambda i: -float(gap[i]))[:pairs]
    a = [a_all[i] for i in pick]
    sub = _Rows(den, a)
    xa, xb = x_T[a], x_T[[b_all[i] for i in pick]]
    lo = torch.zeros(len(a), dtype=torch.float64, device=x_T.device)
    hi = torch.full_like(lo, math.pi / 2)
    r_lo, r_hi = ref[a], ends[pick]
    shape = (-1,) + (1,) * (x_T.ndim - 1)
    xs, rs, thetas = [], [], []
    for _ in range(levels):
        mid = (lo + hi) / 2
        x = torch.cos(mid).view(shape).to(x_T) * xa + torch.sin(mid).view(shape).to(x_T) * xb
        r = exact_sample(sub, x, schedule, rtol=rtol)
        # the midpoint ends on a's side: the jump lies beyond it
        beyond = _per_sample(r, r_lo) < _per_sample(r, r_hi)
        keep = beyond.view(shape)
        lo, hi = torch.where(beyond, mid, lo), torch.where(beyond, hi, mid)
        r_lo, r_hi = torch.where(keep, r, r_lo), torch.where(keep, r_hi, r)
        xs.append(x)
        rs.append(r)
        thetas.append(mid)
    jump = _per_sample(r_lo, r_hi)
    boundary = [i for i in range(len(a)) if float(jump[i]) > 0.5 * float(gap[pick[i]])]
    if not boundary:
        return None
    star = (lo + hi) / 2
    idx = [(lv, i) for lv in range(levels) for i in boundary]
    return _Probes(
        x_T=torch.stack([xs[lv][i] for lv, i in idx]),
        rows=[a[i] for _, i in idx],
        reference=torch.stack([rs[lv][i] for lv, i in idx]),
        pair=[i for _, i in idx],
        distance=[float((thetas[lv][i] - star[i]).abs()) / (math.pi / 2) for lv, i in idx],
        jump=[float(v) for v in jump],
        pairs=n,
        resolution=2.0**-levels,
    )


def _band(prob: _Problem, recipe: Recipe, nfe: int) -> float:
    """The share of the probes' arcs on which ``recipe`` and the reference end in different
    modes, per pair examined (per pair, the distance from the boundary of the farthest
    probe it sends across; inf if it cannot run them)."""
    pr = prob.probes
    if pr is None:
        return 0.0
    x = prob.run_from(recipe, nfe, pr.x_T, _Rows(prob.denoiser, pr.rows))
    if x is None:
        return math.inf
    err = _per_sample(x, pr.reference)
    far: dict[int, float] = {}
    for k, i in enumerate(pr.pair):
        if not float(err[k]) <= 0.5 * pr.jump[i]:  # across the boundary (or not finite)
            far[i] = max(far.get(i, 0.0), pr.distance[k])
    return sum(far.values()) / pr.pairs


class _RowDenoiser:
    """The guided denoiser of the pilot, callable on a subset of its rows (the conditioning
    is per row, so a subset needs its own conditioning)."""

    def __init__(
        self,
        model: Network,
        prediction: Prediction,
        cond: Mapping[str, Any] | None,
        uncond: Mapping[str, Any] | None,
        guidance: float,
        options: SampleOptions | None,
        micro_batch: int | None = None,
    ) -> None:
        self.args = (model, prediction, cond, uncond, guidance, options)
        self.micro_batch = micro_batch
        self.full = self._build(None)
        self.cache: dict[tuple[int, ...], Denoiser] = {}

    def _build(self, rows: list[int] | None) -> Denoiser:
        model, prediction, cond, uncond, guidance, options = self.args

        def pick(c: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
            if c is None or rows is None:
                return c
            return {k: v[rows] if isinstance(v, Tensor) else v for k, v in c.items()}

        return build_denoiser(
            model,
            prediction,
            cond=pick(cond),
            uncond=pick(uncond),
            guidance_scale=guidance,
            options=options,
        )

    def __call__(self, x: Tensor, knot: Knot, rows: list[int] | None = None) -> Tensor:
        m = self.micro_batch
        if m is not None and x.shape[0] > m:
            # one call per micro-batch of samples (both halves of each under guidance)
            every = list(range(x.shape[0])) if rows is None else rows
            parts = [
                self._rows(every[i : i + m])(x[i : i + m], knot) for i in range(0, len(every), m)
            ]
            return torch.cat(parts)
        return self.full(x, knot) if rows is None else self._rows(rows)(x, knot)

    def _rows(self, rows: list[int]) -> Denoiser:
        key = tuple(rows)
        if key not in self.cache:
            self.cache[key] = self._build(rows)
        return self.cache[key]


def _pilot(
    den: _Counter,
    schedule: NoiseSchedule,
    noise: Tensor,
    rtol: float,
    check_rows: int,
    fine: int,
    fine_rows: int = 0,
    probes: tuple[int, int] = (0, 0),
    guard: tuple[int, float] = (0, 2.0),
) -> _Problem:
    """Start states, the reference at ``rtol`` with its error (RMS difference to a 10x
    tighter solve of the first ``check_rows`` rows: that estimates the error of the solve
    at ``rtol`` itself, where a 10x looser one measured its own, ~10x larger error, and the
    estimate needs no more rows), the calibration / held-out rows, the blow-up guard of
    ``guard = (rows, factor)`` (:class:`_Guard`; none for 0 rows), the envelope of the data
    predictions' norms along the reference (:class:`_Envelope`), and with ``fine`` > 0 the
    reference trajectory of the first ``fine_rows`` calibration rows at ``fine`` knots (the
    material of the dynamic programming, which runs on those rows only). The reference is
    the ODE solution at the schedule's last time followed by the data prediction there, as
    :func:`dpmsolver.analytic.exact_sample` defines it."""
    from ..analytic import exact_sample

    start = schedule.knot(schedule.t_max)
    x_T = noise.double() * start.sigma
    rows = list(range(x_T.shape[0]))
    cal, held = rows[0::2], rows[1::2]
    with torch.no_grad():
        seen = _Envelope(den)
        ref = exact_sample(seen, x_T, schedule, rtol=rtol)
        checked = rows[:check_rows]
        tight = exact_sample(_Rows(den, checked), x_T[checked], schedule, rtol=rtol / 10)
        knots: tuple[Knot, ...] = ()
        xs: list[Tensor] = []
        dp_rows = cal[:fine_rows]
        if fine > 0 and dp_rows:
            knots = _fine_knots(schedule, fine)
            sub = _Rows(den, dp_rows)
            xs = [x_T[dp_rows]]
            for a, b in itertools.pairwise(knots):
                xs.append(_segment(sub, xs[-1], a, b, schedule, rtol))
        probed = _probe_boundaries(den, x_T, ref, held, schedule, rtol, *probes)
    spread = float((ref - ref.mean(0, keepdim=True)).pow(2).mean().sqrt())
    guarded = _make_guard(noise, start.sigma, ref, *guard) if guard[0] > 0 else None
    return _Problem(
        den,
        schedule,
        x_T,
        ref,
        cal,
        held,
        spread,
        rtol,
        _rms(tight, ref[checked]),
        knots,
        dp_rows,
        xs,
        probed,
        guarded,
        seen.knots(),
    )


def _end_times(schedule: NoiseSchedule) -> tuple[float, float]:
    """The network times at the schedule's two ends (:class:`CallMerger`'s check)."""
    return schedule.knot(schedule.t_max).model_t, schedule.knot(schedule.t_min).model_t


def _fine_knots(schedule: NoiseSchedule, fine: int) -> tuple[Knot, ...]:
    """The dynamic programming's grid: ``fine`` knots uniform in log-SNR from the start to
    the schedule's last time; from a pure-noise start (rectified flow's t = 1), the first
    finite knot is one time-uniform step in and the rest are uniform in log-SNR after it
    (a time-uniform grid leaves the low-noise end, where the steps matter, almost bare)."""
    start, end = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    if not math.isinf(start.lam):
        return tuple(make_grid(schedule, fine - 1, "logsnr", final="t_min").knots)
    first = schedule.knot(schedule.t_max - (schedule.t_max - schedule.t_min) / (fine - 1))
    lams = torch.linspace(first.lam, end.lam, fine - 1, dtype=torch.float64).tolist()
    inner = [schedule.knot_at_lambda(v) for v in lams[:-1]]
    return (start, *inner, end)


def _segment(
    den: Denoiser, x: Tensor, a: Knot, b: Knot, schedule: NoiseSchedule, rtol: float
) -> Tensor:
    if math.isinf(a.lam):
        from ..analytic import solve_from_pure_noise

        return solve_from_pure_noise(den, x, a, b, schedule, rtol=rtol, atol=rtol * 1e-2)
    return reference_solve(den, x, a, b, schedule, rtol=rtol, atol=rtol * 1e-2)


@dataclass
class _Choice:
    recipe: Recipe
    stage: str
    cal: float
    held: Tensor
    nfe: int
    band: float | None = None  # :func:`_band`, computed when an acceptance needs it

    def pooled(self, calibration_rows: int) -> float:
        """The RMS error over every pilot row, calibration (``calibration_rows`` of them)
        and held-out alike."""
        n = len(self.held)
        total = calibration_rows * self.cal**2 + float(self.held.pow(2).sum())
        return math.sqrt(total / (calibration_rows + n))

    def worse_half(self) -> float:
        """The larger of the RMS errors on the calibration and on the held-out half: a
        choice whose error one half's few far samples carry ranks by that half."""
        return max(self.cal, float(self.held.pow(2).mean().sqrt()))

    def probe_band(self, prob: _Problem) -> float:
        if self.band is None:
            self.band = _band(prob, self.recipe, self.nfe)
        return self.band


def _choice(prob: _Problem, recipe: Recipe, nfe: int, stage: str) -> _Choice:
    x = prob.run(recipe, nfe)
    return _Choice(recipe, stage, _rms_rows(prob, x, prob.cal), prob.errors(x, prob.held), nfe)


def _rms_rows(prob: _Problem, x: Tensor | None, rows: Sequence[int]) -> float:
    return math.inf if x is None else _rms(x[list(rows)], prob.reference[list(rows)])
