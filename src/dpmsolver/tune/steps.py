"""Stage (b) of :func:`dpmsolver.tune`: the time steps for the selected solver.

Dynamic programming over a fine log-SNR grid of the reference trajectories, each candidate
step being the solver's own step from the best path's state (the optimal-stepsize search,
OSS; GITS, Chen et al. 2024, scores first-order local errors), then Nelder-Mead on the
log-SNR increments against the solver's actual error (optimized time steps, Xue et al.
2024); solvers of order 2 and up keep each step within ``step_ratio`` of the one before."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..plan import solver_orders, step_order
from ..recipe import Recipe
from ..schedules import NoiseSchedule
from ..solvers import MultistepSolver, Solver, StepContext
from .acceptance import _accept
from .comparison import _rms
from .options import TuneOptions
from .pilot import _Choice, _choice, _Problem, _Rows


def _steps_of(recipe: Recipe, schedule: NoiseSchedule, nfe: int) -> int | None:
    """How many grid steps (the noisy intervals and the final one) the recipe's solver
    plans for ``nfe`` evaluations; None if it cannot spend them."""
    try:
        return len(_budget_orders(recipe, nfe)[1])
    except ValueError:
        return None


def _budget_orders(recipe: Recipe, nfe: int) -> tuple[Solver, list[int]]:
    """The recipe's solver and its step orders for ``nfe`` evaluations ending at sigma = 0,
    with the recipe's ``lower_order_final`` (ValueError if it cannot spend them)."""
    solver = dataclasses.replace(recipe, timesteps=None).build_solver()
    lof = recipe.lower_order_final
    return solver, solver_orders(solver, nfe=nfe, final_zero=True, lower_order_final=lof)


def _oss_knots(
    prob: _Problem, recipe: Recipe, nfe: int, ratio: float | None = None
) -> list[float] | None:
    """Dynamic programming with the solver's own steps (as "optimal stepsize" search, OSS):
    knot by knot over the fine grid, each (steps taken, knot) keeps the path whose *own*
    state there is closest to the reference trajectory, extending it with the solver's
    actual update (its multistep history included); the last knot is free and scored by
    the final data-prediction step. One evaluation per (steps, knot) state, on the
    trajectory's rows. Multistep solvers only (a singlestep step would evaluate inside
    every candidate step); None otherwise. With ``ratio``, no step grows more than that
    factor over the kept path's previous one (:attr:`TuneOptions.step_ratio`)."""
    # (only for recipes that :func:`_steps_of` found able to spend ``nfe``)
    solver, orders = _budget_orders(recipe, nfe)
    if not isinstance(solver, MultistepSolver):
        return None
    if not _extrapolates(solver):
        ratio = None
    intervals = len(orders) - 1
    knots, f = prob.fine, len(prob.fine)
    if intervals > f - 1 or intervals < 1:
        return None
    rows = prob.fine_rows
    den = _Rows(prob.denoiser, rows)
    targets = prob.fine_x
    ref = prob.reference[rows]
    # paths[j] = (cost, state x at knot j, solver state, knots of the path) after k steps
    paths: dict[int, tuple[float, Tensor, Any, list[int]]] = {
        0: (0.0, targets[0], solver.init_state(), [0])
    }
    with torch.no_grad():
        for k in range(intervals):
            nxt: dict[int, tuple[float, Tensor, Any, list[int]]] = {}
            last = f - (intervals - k - 1)  # leave room for the remaining steps
            for i, (_, x_i, st_i, path) in paths.items():
                x0 = den(x_i, knots[i])
                prev = [knots[v].lam for v in path[-2:]]
                for j in range(i + 1, last):
                    if _steep([*prev, knots[j].lam], ratio):
                        break  # later knots make the step longer still
                    ctx = StepContext(k, knots[i], knots[j], orders[k], den, prob.schedule)
                    order = step_order(solver, knots[i], knots[j], orders[k])
                    ctx = dataclasses.replace(ctx, order=order)
                    x_j, st_j = solver.step(ctx, x_i, x0, st_i)
                    c = _rms(x_j, targets[j])
                    if c < nxt.get(j, (math.inf,))[0]:
                        nxt[j] = (c, x_j, st_j, [*path, j])
            paths = nxt
        if not paths:
            return None
        scored = [(_rms(den(x, knots[j]), ref), path) for j, (_, x, _, path) in paths.items()]
    _, path = min(scored, key=lambda e: e[0])
    return [knots[j].lam for j in path]


def _knot_times(prob: _Problem, lams: Sequence[float]) -> tuple[float, ...] | None:
    """Schedule times of a path of noisy knots given by log-SNR (the first one the
    schedule's start), or None if they do not decrease in time inside the schedule."""
    sched = prob.schedule
    start = sched.knot(sched.t_max)
    lam_end = sched.knot(sched.t_min).lam
    if any(v > lam_end for v in lams[1:]):
        return None
    times = (start.t, *(sched.knot_at_lambda(v).t for v in lams[1:]))
    if any(b >= a for a, b in itertools.pairwise(times)):
        return None
    return times


def _steep(lams: Sequence[float], ratio: float | None) -> bool:
    """Whether a step between the log-SNRs ``lams`` grows more than ``ratio`` x over the
    finite step before it (never with ``ratio`` None)."""
    if ratio is None:
        return False
    h = [b - a for a, b in itertools.pairwise(lams) if math.isfinite(a) and math.isfinite(b)]
    return any(b > ratio * a for a, b in itertools.pairwise(h))


def _extrapolates(solver: Solver) -> bool:
    """Whether the solver's steps extrapolate from earlier model outputs (a multistep
    solver of order 2 or more)."""
    return isinstance(solver, MultistepSolver) and solver.order >= 2


def _uses_history(recipe: Recipe) -> bool:
    """:func:`_extrapolates` for the recipe's solver."""
    return _extrapolates(dataclasses.replace(recipe, timesteps=None).build_solver())


def _with_knots(
    prob: _Problem, base: Recipe, lams: Sequence[float], ratio: float | None = None
) -> Recipe | None:
    """``base`` on the noisy knots ``lams`` (log-SNR) followed by its final step to 0;
    None if they do not decrease in time, or (for a ``base`` whose steps use earlier model
    outputs) a step grows more than ``ratio`` x over the one before it."""
    if ratio is not None and _uses_history(base) and _steep(lams, ratio):
        return None
    times = _knot_times(prob, lams)
    if times is None:
        return None
    return dataclasses.replace(
        base,
        grid=None,
        rho=None,
        sigma_max=None,
        sigma_end=None,
        t_end=None,
        timesteps=times,
        final="zero",
    )


def _capped_error(prob: _Problem, recipe: Recipe | None, nfe: int, rows: Sequence[int]) -> float:
    """The Nelder-Mead objectives' value: ``recipe``'s RMS error on ``rows``, capped at 1e3
    (also for no recipe, or one that cannot spend ``nfe``) so that a blow-up stays a
    finite, comparable value for the simplex."""
    x = None if recipe is None else prob.run(recipe, nfe, rows)
    return 1e3 if x is None else min(_rms(x, prob.reference[list(rows)]), 1e3)


def _refine(
    prob: _Problem,
    base: Recipe,
    nfe: int,
    lams: Sequence[float],
    runs: int,
    rows: Sequence[int],
    ratio: float | None = None,
) -> _Choice | None:
    """Nelder-Mead on the free noisy knots (log-SNR increments; the first finite knot
    itself after a pure-noise start) against the solver's own error on the calibration
    rows ``rows``, from the knots ``lams`` (log-SNRs of the noisy knots, as many as the
    solver plans); the first knot stays the schedule's start. Knots whose steps grow more
    than ``ratio`` x score as a blow-up (:func:`_with_knots`)."""
    from scipy.optimize import minimize

    pure = math.isinf(lams[0])  # a pure-noise start: the next knot is free too

    def lams_of(u: Sequence[float]) -> list[float]:
        lam = u[0] if pure else lams[0]
        ks = [lams[0], lam] if pure else [lam]
        for v in u[1:] if pure else u:
            lam = lam + math.exp(v)
            ks.append(lam)
        return ks

    def objective(u: Sequence[float]) -> float:
        return _capped_error(prob, _with_knots(prob, base, lams_of(u), ratio), nfe, rows)

    free = list(lams[1:] if pure else lams)
    inc = [math.log(max(b - a, 1e-6)) for a, b in itertools.pairwise(free)]
    u0 = [free[0], *inc] if pure else inc
    f0 = objective(u0)
    u = u0
    if runs > 0 and u0:
        res = minimize(
            objective,
            u0,
            method="Nelder-Mead",
            options={"maxfev": runs, "xatol": 1e-4, "fatol": 1e-7},
        )
        u = list(res.x) if float(res.fun) < f0 else u0
    r = _with_knots(prob, base, lams_of(u), ratio)
    return None if r is None else _choice(prob, r, nfe, "steps")


def _fitted_steps(
    prob: _Problem, nfe: int, best: _Choice, candidates: Sequence[_Choice], opts: TuneOptions
) -> _Choice | None:
    """Stage (b) for budget ``nfe``: the dynamic programming for the first
    ``opts.step_bases`` distinct ``candidates`` (the chosen solver, the next best finalists,
    the default), each from its own grid's knots and its DP knots; the best of those starts
    on the calibration rows is refined against its actual error. The refined knots if the
    held-out half takes them over ``best``, else the better of the DP's own if it takes one
    of those, else None."""
    bases: list[_Choice] = []
    for c in candidates:
        if len(bases) >= opts.step_bases:
            break
        if all(c.recipe != b.recipe for b in bases) and math.isfinite(c.cal):
            steps = _steps_of(c.recipe, prob.schedule, nfe)
            if steps is not None and steps >= 2:
                bases.append(c)
    starts: list[tuple[float, Recipe, list[float]]] = []
    fits: list[tuple[float, Recipe]] = []  # the DP's knots as recipes, by calibration error
    ratio = opts.step_ratio
    for c in bases if prob.fine else []:
        own = [k.lam for k in c.recipe.plan(prob.schedule, nfe=nfe).grid.knots[:-1]]
        if _with_knots(prob, c.recipe, own, ratio) is not None:
            starts.append((c.cal, c.recipe, own))
        # DPM-Solver-v3 integrates its statistics afresh for every candidate step of the
        # search (on a 16-d mixture 4x the rest of the tune): its knots are refined only
        dp = None if c.recipe.solver == "dpmv3" else _oss_knots(prob, c.recipe, nfe, ratio)
        if dp is not None and len(dp) == len(own):
            fit = _with_knots(prob, c.recipe, dp, ratio)
            x = None if fit is None else prob.run(fit, nfe, prob.cal)
            if fit is not None and x is not None:
                err = _rms(x, prob.reference[prob.cal])
                starts.append((err, c.recipe, dp))
                fits.append((err, fit))
    if not starts:
        return None
    _, base, lams = min(starts, key=lambda e: e[0])
    fitted = _refine(prob, base, nfe, lams, opts.refine_runs, prob.cal[: opts.refine_rows], ratio)
    if fitted is not None and _accept(fitted, best, prob, opts):
        return fitted
    # the refined knots did not carry over to the held-out half: the DP's own may
    for _, fit in sorted(fits, key=lambda e: e[0])[:2]:
        dp_choice = _choice(prob, fit, nfe, "steps")
        if _accept(dp_choice, best, prob, opts):
            return dp_choice
    return None
