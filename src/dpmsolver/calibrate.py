"""Time steps optimized for one model (an opt-in complement to ``solver="auto"``).

``auto``'s grids are chosen once, for every model. Optimized time steps (Sabour et al.,
"Align Your Steps", 2024; Xue et al., "Accelerating Diffusion Sampling with Optimized Time
Steps", CVPR 2024) instead tune the knots of a fixed solver for one model and one guidance
scale. Here the knots of a :class:`~dpmsolver.auto.Recipe` (default: auto's recipe for the
budget) are tuned by Nelder-Mead to minimize the RMS error of the final samples against
reference samples (:func:`dpmsolver.analytic.reference_sample`) for a set of calibration
noises, starting from the recipe's own grid, so the calibration error can only fall. The
free parameters are the logs of the log-SNR increments between the fixed first knot
(``t_max``) and the last noisy knot; the step to sigma = 0 stays the recipe's final step.
Every other calibration sample is held out of the fit: the fitted knots are kept only if
they also lower the error on those, since fitted knots can overfit and, under strong
guidance, trade the fitted samples' error for a blow-up elsewhere.

What it buys is measured, on noise the calibration never saw, by ``dpmsolver bench --only
steps`` (README): large gains at 8-10 evaluations under strong guidance, none at 5-6.
Calibration needs the reference samples (one accurate ODE solve per calibration noise) and
a few hundred sampler runs; it needs scipy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .auto import recommend
from .denoiser import Denoiser
from .loop import NonFiniteError, solve
from .recipe import Recipe
from .schedules import NoiseSchedule
from .timegrid import TimeGrid, grid_from_sigmas

__all__ = ["CalibratedSteps", "calibrate_steps", "rms_error", "run_calibrated"]


def rms_error(a: Tensor, b: Tensor) -> float:
    """Root-mean-square error per coordinate (inf if ``a`` is not finite)."""
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@dataclass(frozen=True)
class CalibratedSteps:
    """Knots fitted for one model, guidance scale and budget.

    Attributes:
        recipe: the solver configuration the knots were fitted for.
        nfe: the evaluation budget.
        sigmas: k-diffusion sigmas of the knots, ending with 0; pass them as
            ``dpmsolver.sample(..., sigmas=...)`` together with the recipe's solver.
        start_error, error: RMS error on the fitted half of the calibration samples, on the
            recipe's grid and on the returned knots.
        validation_start, validation_error: the same on the held-out half.
        accepted: False when the fit did not help the held-out half and the recipe's own
            knots were returned.
    """

    recipe: Recipe
    nfe: int
    sigmas: tuple[float, ...]
    start_error: float
    error: float
    validation_start: float
    validation_error: float
    accepted: bool

    @property
    def lams(self) -> list[float]:
        """Log-SNR of the noisy knots (what :func:`run_calibrated` takes)."""
        return [-math.log(v) for v in self.sigmas[:-1]]

    def grid(self, schedule: NoiseSchedule) -> TimeGrid:
        """The fitted knots as a grid of ``schedule``."""
        return grid_from_sigmas(schedule, self.sigmas)


def run_calibrated(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    recipe: Recipe,
    nfe: int,
    lams: Sequence[float] | None = None,
) -> Tensor | None:
    """``recipe``'s final sample from ``x_T`` (at ``t_max``) with ``nfe`` evaluations, on its
    own grid or through the noisy knots at log-SNR ``lams``; None if it diverges."""
    plan = recipe.plan(schedule, nfe=nfe)
    solver, orders, grid = plan.solver, plan.orders, plan.grid
    if lams is not None:
        if len(lams) != len(orders):
            raise ValueError(
                f"lams: nfe={nfe} with {recipe.describe()} needs {len(orders)} noisy knots, got "
                f"{len(lams)}"
            )
        # the first knot stays exactly the recipe's (a sigma round trip can land past t_max)
        knots = (
            grid.knots[0],
            *(schedule.knot_at_lambda(v) for v in lams[1:]),
            schedule.zero_knot(),
        )
        grid = TimeGrid(knots, schedule)
    try:
        with torch.no_grad():
            return solve(
                denoiser,
                x_T,
                grid,
                solver,
                orders=orders,
                check_finite="off",
                final_step=recipe.final_step,
                start=grid.pure_noise_entry,  # x_T is at t_max
            ).x
    except NonFiniteError:
        return None


def calibrate_steps(
    denoiser: Denoiser,
    x_T: Tensor,
    reference: Tensor,
    schedule: NoiseSchedule,
    nfe: int,
    *,
    guidance_scale: float = 1.0,
    recipe: Recipe | None = None,
    max_evals: int = 400,
) -> CalibratedSteps:
    """Fit the knots of ``recipe`` (default ``recommend(nfe, guidance_scale)``) for
    ``denoiser`` (guidance included): minimize the RMS error of the samples from the even
    calibration states ``x_T[0::2]`` (at ``t_max``) against ``reference``, and keep the fit
    only if it also lowers the error of the odd ones (module doc)."""
    try:
        from scipy.optimize import minimize
    except ImportError as e:  # pragma: no cover - scipy is in the test/bench extras
        raise ImportError("calibrate_steps needs scipy: pip install scipy") from e
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals}")
    if x_T.shape[0] < 2 or reference.shape != x_T.shape:
        raise ValueError(
            "x_T and reference must have the same shape with at least 2 samples; got "
            f"{tuple(x_T.shape)} and {tuple(reference.shape)}"
        )
    recipe = recommend(nfe, guidance_scale) if recipe is None else recipe
    lam0 = [k.lam for k in recipe.plan(schedule, nfe=nfe).grid.knots[:-1]]
    lam_max = schedule.knot(schedule.t_min).lam

    def lams_of(u: Sequence[float]) -> list[float]:
        return list(itertools.accumulate((math.exp(v) for v in u), initial=lam0[0]))

    def errors(u: Sequence[float]) -> tuple[float, float]:
        # The whole batch runs (the denoiser's conditioning is per row, and rows are
        # independent); the fit reads the even rows, validation the odd ones.
        lams = lams_of(u)
        if lams[-1] > lam_max:  # past the schedule's last time
            return 1e3, 1e3
        x = run_calibrated(denoiser, x_T, schedule, recipe, nfe, lams)
        if x is None:
            return 1e3, 1e3
        return min(rms_error(x[0::2], reference[0::2]), 1e3), min(
            rms_error(x[1::2], reference[1::2]), 1e3
        )

    u0 = [math.log(b - a) for a, b in itertools.pairwise(lam0)]
    start, val_start = errors(u0)
    best, best_err, val_err = u0, start, val_start
    if u0:  # one noisy knot leaves nothing to move
        res = minimize(
            lambda u: errors(u)[0],
            u0,
            method="Nelder-Mead",
            options={"maxfev": max_evals, "xatol": 1e-4, "fatol": 1e-7},
        )
        if float(res.fun) < start:
            best, (best_err, val_err) = list(res.x), errors(res.x)
    accepted = val_err < val_start
    if not accepted:
        best, best_err, val_err = u0, start, val_start
    sigmas = (*(math.exp(-v) for v in lams_of(best)), 0.0)
    return CalibratedSteps(recipe, nfe, sigmas, start, best_err, val_start, val_err, accepted)
