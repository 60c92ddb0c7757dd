"""The stages of :func:`dpmsolver.tune` that fit a recipe's extras on fixed knots.

(c) the network's time at each knot (:func:`_shift`; the decoupled time of LD3, Tong et
al. 2024), (f) the data prediction's compensation ratios (:func:`_compensate`; DC-Solver,
Zhao et al. 2024), (g) its correction in the trajectory's principal directions
(:func:`_correct`; PAS, Wang et al. 2025; optionally refitted against the final sample
as S4S fits, :func:`_refit_correction`), and the studies (h) the order of each step
(:func:`_reorder`; USF, Liu et al. 2024) and (i) which UniPC corrections to leave out
(:func:`_uncorrect`), with (d) the step limit and (e) the extrapolated final step, which
only switch an option on. Each offers a candidate :class:`~dpmsolver.tune.pilot._Choice`
built on the choice so far (:data:`LATE_STAGES`, in the order they run); the held-out half
decides (:mod:`dpmsolver.tune.acceptance`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..correction import CorrectionFit
from ..recipe import Recipe
from ..solvers import AdaptiveSolver, MultistepSolver, UniPC
from .options import TuneOptions
from .pilot import _Choice, _choice, _Problem, _Rows, _segment
from .steps import _capped_error, _extrapolates

_SHIFT_STEP = 0.05  # a few hundredths of log-SNR
_COMPENSATION_STEP = 0.1
_REFIT_STEP = 1e-3  # forward differences, relative to the largest coefficient
_REFIT_DAMPING = 1e-2  # Levenberg-Marquardt's, times the normal matrix's diagonal
_REFIT_TRIES = 4  # damping increases before an iteration gives up
_REFIT_CAP = 2.0  # a row beyond this many times the median row error weighs as one there


def _shift(
    prob: _Problem, base: Recipe, nfe: int, runs: int, rows: Sequence[int], bound: float
) -> _Choice | None:
    """Stage (c): Nelder-Mead on one log-SNR offset per finite noisy knot of ``base`` for
    the time the network is told there (:attr:`~dpmsolver.recipe.Recipe.model_shifts`;
    LD3's decoupled time, Tong et al. 2024), from none, against the error on the
    calibration rows ``rows``, each offset kept within ``bound`` (a smooth clamp).
    Multistep solvers only: a singlestep solver also evaluates
    between the knots, where nothing would move. None if nothing lowered the error."""
    if base.model_shifts is not None or not isinstance(base.build_solver(), MultistepSolver):
        return None
    plan = prob.plan(base, nfe)
    if plan is None:
        return None
    noisy = [k for k in plan.grid.knots if k.sigma > 0]
    free = [i for i, k in enumerate(noisy) if math.isfinite(k.lam)]
    if not free:
        return None

    def recipe_of(u: Sequence[float]) -> Recipe:
        shifts = [0.0] * len(noisy)
        for i, v in zip(free, u, strict=True):
            shifts[i] = v
        return dataclasses.replace(base, model_shifts=tuple(shifts))

    return _bounded_fit(prob, recipe_of, len(free), bound, _SHIFT_STEP, (nfe, runs, rows), "shifts")


def _compensate(prob: _Problem, base: Recipe, nfe: int, opts: TuneOptions) -> _Choice | None:
    """Stage (f): Nelder-Mead (``opts.compensation_runs`` runs) on one ratio per step after
    the first by which the data prediction is extrapolated from the previous knot's
    (:class:`~dpmsolver.compensation.Compensation`; DC-Solver's dynamic compensation, Zhao
    et al. 2024, at first degree), from none, against the error on the first
    ``opts.compensation_rows`` calibration rows, each ratio within
    ``opts.compensation_bound`` (a smooth clamp). With more than
    ``opts.compensation_knots`` ratios, that many values spread evenly over the steps are
    fitted and the ratios are linear between them. None if nothing lowered the error."""
    if base.compensation is not None or base.build_solver().stochastic:
        return None
    plan = prob.plan(base, nfe)
    if plan is None or len(plan.steps) < 2:
        return None
    n = len(plan.steps) - 1

    def recipe_of(u: Sequence[float]) -> Recipe:
        return dataclasses.replace(base, compensation=_spread(u, n))

    run = (nfe, opts.compensation_runs, prob.cal[: opts.compensation_rows])
    free = min(n, opts.compensation_knots)
    bound = opts.compensation_bound
    return _bounded_fit(prob, recipe_of, free, bound, _COMPENSATION_STEP, run, "compensation")


def _correct(prob: _Problem, base: Recipe, nfe: int, opts: TuneOptions) -> _Choice | None:
    """Stage (g): each step's ``opts.correction_components`` coordinates in the
    trajectory's principal directions (:class:`~dpmsolver.correction.Correction`, PAS, Wang
    et al. 2025), fitted step by step by least squares on the first ``opts.correction_rows``
    calibration rows against their exact state at the step's end knot (the reference itself
    after the last step). None where the recipe has no fixed one-evaluation steps to
    correct (an adaptive, stochastic or singlestep solver) or already has a correction."""
    corrected = _fitted_correction(prob, base, nfe, opts)
    return None if corrected is None else _choice(prob, corrected, nfe, "correction")


def _fitted_correction(prob: _Problem, base: Recipe, nfe: int, opts: TuneOptions) -> Recipe | None:
    """``base`` with stage (g)'s step-by-step fit (:func:`_correct`), or None."""
    plan = prob.plan(base, nfe)
    if (
        base.correction is not None
        or plan is None
        or plan.solver.stochastic
        or isinstance(plan.solver, AdaptiveSolver)
        or any(step.evals != 1 for step in plan.steps)
    ):
        return None
    rows = prob.cal[: opts.correction_rows]
    den = _Rows(prob.denoiser, rows)
    x = prob.x_T[rows]
    targets: list[Tensor] = []
    with torch.no_grad():
        for step in plan.steps[:-1]:
            x = _segment(den, x, step.s, step.t, prob.schedule, prob.rtol)
            targets.append(x)
        targets.append(prob.reference[rows])
        fit = CorrectionFit(opts.correction_components, len(plan.steps), prob.x_T[rows], targets)
        prob.run_from(base, nfe, prob.x_T[rows], den, fit)
    return dataclasses.replace(base, correction=tuple(fit.fitted))


def _refit(prob: _Problem, base: Recipe, nfe: int, opts: TuneOptions) -> _Choice | None:
    """Stage (g2): stage (g)'s coefficients refitted against the final sample
    (:func:`_refit_correction`), from ``base``'s own where stage (g) was kept, else from
    the fit it offered (made again: the same rows give the same fit). None where stage (g)
    had nothing to fit."""
    start = base if base.correction is not None else _fitted_correction(prob, base, nfe, opts)
    if start is None:
        return None
    refit = _refit_correction(prob, start, nfe, prob.cal, opts.correction_refine)
    return _choice(prob, refit, nfe, "correction")


def _refit_correction(
    prob: _Problem, recipe: Recipe, nfe: int, rows: Sequence[int], iterations: int
) -> Recipe:
    """Stage (g)'s coefficients refitted all together (``iterations`` Gauss-Newton steps,
    Levenberg-Marquardt damped, forward-difference Jacobian: one run per coefficient)
    against the final samples' error on ``rows``. S4S (Frankel et al., "S4S: Solving for a
    Diffusion Model Solver", ICML 2025) fits its per-step coefficients to the final sample
    in the same way, where the step-by-step fit matches each intermediate state, whose
    errors need not add up to the final one's. Each step kept lowers the error on
    ``rows``; ``recipe`` itself where none did."""
    assert recipe.correction is not None
    steps, width = len(recipe.correction), len(recipe.correction[0])
    target = prob.reference[list(rows)].reshape(-1).double()

    def coefficients(c: Tensor) -> tuple[tuple[float, ...], ...]:
        flat = [float(v) for v in c]
        return tuple(tuple(flat[i * width : (i + 1) * width]) for i in range(steps))

    def residual(c: Tensor) -> Tensor | None:
        if not bool(torch.isfinite(c).all()):
            return None
        x = prob.run(dataclasses.replace(recipe, correction=coefficients(c)), nfe, rows)
        r = None if x is None else x.reshape(-1).double() - target
        return r if r is not None and bool(torch.isfinite(r).all()) else None

    c = torch.tensor(recipe.correction, dtype=torch.float64).reshape(-1)
    r = residual(c)
    if r is None:
        return recipe
    weight = _row_weights(r, len(rows))

    def weighted(c: Tensor) -> Tensor | None:
        out = residual(c)
        return None if out is None else out * weight

    c = _levenberg_marquardt(weighted, c, r * weight, iterations)
    return dataclasses.replace(recipe, correction=coefficients(c))


def _row_weights(r: Tensor, rows: int) -> Tensor:
    """Weights on the residual ``r`` of ``rows`` equal rows: 1 up to twice the median row
    error, beyond it that bound over the row's error, so that a far row counts as one at
    the bound. A row sent to another mode is a mode spacing away, which no small
    correction brings back; unweighted (or Huber-weighted, whose share still grows with the
    distance) it steers every coefficient towards itself."""
    per_row = r.view(rows, -1).pow(2).mean(1).sqrt()
    bound = _REFIT_CAP * float(per_row.median())
    return (bound / per_row.clamp_min(bound)).repeat_interleave(r.numel() // rows)


def _levenberg_marquardt(
    residual: Callable[[Tensor], Tensor | None], c: Tensor, r: Tensor, iterations: int
) -> Tensor:
    """``iterations`` Levenberg-Marquardt steps on ``sum(residual(c)^2)`` from ``c`` (whose
    residual is ``r``), with a forward-difference Jacobian (one call per parameter) and the
    damping times the normal matrix's diagonal; a step is kept only where the sum falls, and
    the parameters reached where a call fails (None: a run that could not finish)."""
    damping = _REFIT_DAMPING
    for _ in range(iterations):
        h = _REFIT_STEP * max(float(c.abs().max()), 1e-2)
        cols = []
        for j in range(len(c)):
            moved = c.clone()
            moved[j] += h
            rj = residual(moved)
            if rj is None:
                return c
            cols.append((rj - r) / h)
        jac = torch.stack(cols, 1)
        jtj, grad = jac.T @ jac, jac.T @ r
        scale = torch.diag(jtj.diagonal() + torch.finfo(torch.float64).tiny)
        for _ in range(_REFIT_TRIES):
            d = torch.linalg.solve(jtj + damping * scale, -grad).cpu()
            moved_r = residual(c + d)
            if moved_r is not None and float(moved_r.square().sum()) < float(r.square().sum()):
                c, r, damping = c + d, moved_r, damping / 10
                break
            damping *= 10
        else:
            break
    return c


def _greedy_pass(
    prob: _Problem,
    nfe: int,
    rows: Sequence[int],
    start: Sequence[Any],
    tries: Sequence[Sequence[Any]],
    recipe_of: Callable[[list[Any]], Recipe],
) -> list[Any] | None:
    """One greedy pass over a per-step setting (stages (h) and (i)): from ``start``, step
    ``i`` is tried at each value of ``tries[i]`` in turn (the others as chosen so far) and
    kept at the one with the smallest capped error on ``rows`` (:func:`_capped_error`). The
    settings, or None where nothing lowered the error."""
    current = list(start)

    def error(candidate: list[Any]) -> float:
        return _capped_error(prob, recipe_of(candidate), nfe, rows)

    first = best = error(current)
    for i, values in enumerate(tries):
        for v in values:
            e = error([*current[:i], v, *current[i + 1 :]])
            if e < best:
                best, current[i] = e, v
    return current if best < first else None


def _reorder(prob: _Problem, base: Recipe, nfe: int, rows: Sequence[int]) -> _Choice | None:
    """Stage (h): one greedy pass (:func:`_greedy_pass`) over ``base``'s steps, first to
    last, each tried at every order below its planned one; the choice, or None where no
    step has a lower order to try (a multistep solver of order 2 or more only: their steps
    cost one evaluation at any order) or nothing lowered the error."""
    plan = prob.plan(base, nfe)
    if (
        base.orders is not None
        or plan is None
        or not _extrapolates(plan.solver)
        or any(step.evals != 1 for step in plan.steps)
    ):
        return None
    if all(o <= 1 for o in plan.orders):
        return None
    tries = [range(planned - 1, 0, -1) for planned in plan.orders]

    def recipe_of(orders: list[Any]) -> Recipe:
        return dataclasses.replace(base, orders=tuple(orders))

    orders = _greedy_pass(prob, nfe, rows, plan.orders, tries, recipe_of)
    return None if orders is None else _choice(prob, recipe_of(orders), nfe, "orders")


def _uncorrect(prob: _Problem, base: Recipe, nfe: int, rows: Sequence[int]) -> _Choice | None:
    """Stage (i): one greedy pass (:func:`_greedy_pass`) over the steps of a UniPC recipe
    whose result the next step corrects, first to last, each tried uncorrected
    (``corrector_skip``, diffusers' ``disable_corrector``; USF's per-step strategy for the
    corrector); the choice, or None where the recipe has no corrector to skip or nothing
    lowered the error. A skipped correction costs no evaluation either way."""
    plan = prob.plan(base, nfe)
    solver = None if plan is None else plan.solver
    if (
        plan is None
        or not isinstance(solver, UniPC)
        or not solver.use_corrector
        or solver.corrector_skip
        or any(step.evals != 1 for step in plan.steps)
    ):
        return None
    # step i's result is corrected at step i + 1's start, unless that step is the loop's
    # own (into sigma = 0) or step i starts at pure noise (UniPC.correct)
    steps = plan.steps
    free = [
        i
        for i in range(len(steps) - 1)
        if not steps[i + 1].boundary and math.isfinite(steps[i].s.lam)
    ]
    if not free:
        return None

    def recipe_of(corrected: list[Any]) -> Recipe:
        skip = tuple(i for i, on in zip(free, corrected, strict=True) if not on)
        return dataclasses.replace(base, options={**base.options, "corrector_skip": skip})

    corrected = _greedy_pass(prob, nfe, rows, [True] * len(free), [(False,)] * len(free), recipe_of)
    return None if corrected is None else _choice(prob, recipe_of(corrected), nfe, "corrector")


def _spread(values: Sequence[float], n: int) -> tuple[float, ...]:
    """``n`` values linear between ``values`` placed evenly from the first to the last
    (``values`` itself when there are ``n``). The clamp of :func:`_bounded_fit` holds for
    them too: each is between two clamped values."""
    m = len(values)
    if m == n:
        return tuple(float(v) for v in values)
    out = []
    for i in range(n):
        x = i * (m - 1) / (n - 1)
        j = min(int(x), m - 2)
        t = x - j
        out.append((1.0 - t) * float(values[j]) + t * float(values[j + 1]))
    return tuple(out)


def _bounded_fit(
    prob: _Problem,
    recipe_of: Callable[[Sequence[float]], Recipe],
    n: int,
    bound: float,
    step: float,
    run: tuple[int, int, Sequence[int]],
    stage: str,
) -> _Choice | None:
    """Nelder-Mead on ``n`` parameters of ``recipe_of``, each held within ``bound`` by a
    smooth clamp, from all zeros, against the capped error on ``rows`` (``run`` is ``(nfe,
    runs, rows)``); the choice, or None if nothing lowered the error."""
    from scipy.optimize import minimize

    nfe, runs, rows = run

    def clamped(u: Sequence[float]) -> Recipe:
        return recipe_of([bound * math.tanh(float(v) / bound) for v in u])

    def objective(u: Sequence[float]) -> float:
        return _capped_error(prob, clamped(u), nfe, rows)

    u0 = [0.0] * n
    f0 = objective(u0)
    # scipy's default first simplex (0.00025 around zero) needs most of a small budget to
    # grow to the useful scale
    simplex = [u0, *([step if j == i else 0.0 for j in range(n)] for i in range(n))]
    res = minimize(
        objective,
        u0,
        method="Nelder-Mead",
        options={"maxfev": runs, "xatol": 1e-4, "fatol": 1e-7, "initial_simplex": simplex},
    )
    if not float(res.fun) < f0:
        return None
    return _choice(prob, clamped(list(res.x)), nfe, stage)


# Each late stage's offer: the candidate it builds on ``best`` for budget ``nfe``, or None
# where the options or the budget leave it out.


def _shifted(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(c) the network's time at each knot."""
    if opts.shift_runs <= 0:
        return None
    rows = prob.cal[: opts.shift_rows]
    return _shift(prob, best.recipe, nfe, opts.shift_runs, rows, opts.shift_bound)


def _limited(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(d) the per-sample step limit."""
    if opts.step_limit is None or best.recipe.step_limit is not None:
        return None
    limited = dataclasses.replace(best.recipe, step_limit=opts.step_limit)
    return _choice(prob, limited, nfe, best.stage)


def _extrapolated(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(e) the step into sigma = 0 extrapolated from the last two data predictions."""
    if not opts.extrapolate_final or best.recipe.final_step != "denoise":
        return None
    extrapolated = dataclasses.replace(best.recipe, final_step="extrapolate")
    return _choice(prob, extrapolated, nfe, best.stage)


def _reordered(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(h) the order of each step (a study)."""
    if not opts.order_search or nfe > opts.order_max_nfe:
        return None
    return _reorder(prob, best.recipe, nfe, prob.cal[: opts.order_rows])


def _uncorrected(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(i) which steps' results UniPC leaves uncorrected (a study)."""
    if not opts.corrector_search or nfe > opts.corrector_max_nfe:
        return None
    return _uncorrect(prob, best.recipe, nfe, prob.cal[: opts.corrector_rows])


def _compensated(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(f) the data predictions extrapolated from the previous knot's, by a ratio per step."""
    if opts.compensation_runs <= 0 or nfe > opts.compensation_max_nfe:
        return None
    return _compensate(prob, best.recipe, nfe, opts)


def _corrected(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(g) the data predictions corrected in the trajectory's principal directions."""
    if opts.correction_components <= 0 or nfe > opts.correction_max_nfe:
        return None
    return _correct(prob, best.recipe, nfe, opts)


def _refitted(prob: _Problem, best: _Choice, nfe: int, opts: TuneOptions) -> _Choice | None:
    """(g2) stage (g)'s correction refitted against the final sample (a study)."""
    if opts.correction_refine <= 0 or opts.correction_components <= 0:
        return None
    if nfe > opts.correction_max_nfe:
        return None
    return _refit(prob, best.recipe, nfe, opts)


#: The stages after (b), in the order they run: each offer, and whether the held-out half
#: judges it on the samples it changes only (the step limit leaves the others as they were).
#: (h) and (i) run before (f) and (g), which fit on the trajectory they make; (g2) refits
#: what (g) fitted, kept or not.
LATE_STAGES: tuple[
    tuple[Callable[[_Problem, _Choice, int, TuneOptions], _Choice | None], bool], ...
] = (
    (_shifted, False),
    (_limited, True),
    (_extrapolated, False),
    (_reordered, False),
    (_uncorrected, False),
    (_compensated, False),
    (_corrected, False),
    (_refitted, False),
)
