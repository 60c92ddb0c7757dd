"""Fitting the sampler to one model: ``solver="auto"`` calibrated on pilot noises.

No fixed recipe is best for every model: the best solver, grid and time steps for a budget
depend on the model and the guidance scale (measured: a table chosen on two problems was up
to 41x the best peer on problems it never saw). Every strong few-step method fits something
per model: GITS (dynamic programming over time steps from pilot trajectories), LD3 (learned
discretization from ~100 samples, validated on a held-out half), Align Your Steps,
DPM-Solver-v3's statistics. :func:`tune` does the training-free part of that on the user's
own model, guidance included:

1. *Reference.* The exact probability-flow ODE solution from every pilot noise (adaptive
   Dormand-Prince, :func:`dpmsolver.analytic.exact_sample`); its error is estimated on a
   subset of rows as the difference to a solve at a 10x tighter tolerance, and the
   tolerance is tightened until that error is at least 10x below the best candidate's (it
   starts at 1e-3: the reference is most of the cost, and the check tightens it where a
   budget needs it; on the built-in model at guidance 7.5, 1e-3 has error 1.8e-4 in 902
   batch evaluations, 1e-4 has 1.6e-5 in 1754, and the best choice's error is 8.6e-3).
2. The pilot is split: even rows calibrate, odd rows are held out. Every stage below is
   kept only if it also helps the held-out half (:func:`paired_better`: lower RMS error and
   a lower median of the per-sample log-ratios, so a few samples cannot carry it) and no
   held-out sample newly diverges (:func:`no_new_divergence`: ends farther from its
   reference than the data's spread where the current choice kept it within half of that).
3. *(a) Selection* among deterministic registered solvers x grid families: every candidate
   is screened on a few calibration rows, the best few on all of them; the winner must beat
   the default recipe (:mod:`dpmsolver.auto`). From 15 evaluations on, the third-order
   multistep solvers are also candidates with the step before the final one at second
   order, as diffusers' UniPC runs them (by default the last orders are lowered only below
   15 steps; on a rectified-flow mixture at 25 evaluations the best candidate without them
   had 3.5x the error of UniPC order 3 with it).
4. *(b) Time steps*, for the selected solver: dynamic programming over a fine log-SNR grid
   of the reference trajectories in which every candidate step is the solver's own step
   from the best path's own state (as the "optimal stepsize" search does; GITS, Chen et al.
   2024, scores first-order local errors instead, which here gave knots 3x worse than the
   solver's default grid), which also chooses where the grid stops before the final
   data-prediction step; then Nelder-Mead on the log-SNR increments against the solver's
   actual error (as optimized time steps, Xue et al. 2024), from the better of those knots
   and the solver's own grid. For solvers of order 2 and up no fitted step may grow more
   than ``step_ratio`` (3) times over the one before: their higher-order term divides by
   that ratio, and a 6.8x jump sent a guidance-15 sample 590 away.
5. *(c) The network's time at each knot*, for the recipe chosen so far (multistep
   solvers): Nelder-Mead on one log-SNR offset per knot of the time the network is told,
   while the solver still steps between the knots themselves (the decoupled time of LD3,
   Tong et al. 2024; :func:`dpmsolver.timegrid.shift_model_times`), each within 0.1 of
   its knot (unbounded, the fit overfits the pilot: see ``TuneOptions.shift_bound``). It
   costs no evaluation when sampling and corrects part of each step's discretization error.
   Sigmas cannot carry it (the k-diffusion functions): tune with ``shift_runs=0`` for them.
6. *(d) A step limit*, for the recipe chosen so far: the same recipe with each sample's
   higher-order correction held within twice its first-order displacement
   (``TuneOptions.step_limit``; :class:`dpmsolver.steplimit.StepLimit`). It changes only
   the samples whose correction outgrows the step, so the paired comparison runs on the
   held-out samples it changes. A sample thrown off the data is also thrown by the
   multistep memory (its stored predictions disagree and the correction outgrows the
   step), but on other models corrections of 4x the step are legitimate: the factor
   alone cannot tell them apart, so the pilot decides per budget.
7. *(e) The step into sigma = 0*, for the recipe chosen so far: the same recipe ending
   with the extrapolated step of :class:`dpmsolver.loop.FinalStep` (the last two data
   predictions extrapolated in sigma~^2 to sigma = 0, which removes the denoising step's
   O(sigma~^2) bias at no evaluation; ``TuneOptions.extrapolate_final``). Whether that
   bias or the extrapolation's own error is larger depends on the model and the budget
   (on a flow mixture it cut the error by 38% at 8 NFE and multiplied it by 2.7 at 20),
   so the pilot decides per budget.
   *(h) The order of each step* (a study, off by default: ``TuneOptions.order_search``;
   ``benchmarks/stage_h.md``), run here, before (f) and (g), at budgets up to 10: one
   greedy pass over the steps of a multistep recipe, each tried at every order below its
   planned one (USF's per-step solver strategy, Liu et al. 2024, for the order alone; a
   multistep step costs one evaluation at any order); sigmas cannot carry it.
   *(i) The corrector of each step* (a study, off by default: ``TuneOptions.corrector_search``;
   ``benchmarks/stage_i.md``), after (h) at budgets up to 10, for UniPC recipes: one greedy
   pass over the steps whose result the next step corrects, each tried uncorrected (UniPC's
   ``corrector_skip``, diffusers' ``disable_corrector``, which its documentation suggests
   for the first steps under large guidance; USF's per-step strategy for the corrector);
   sigmas cannot carry it.
8. *(f) Compensation of the data prediction*, for the recipe chosen so far, at budgets up
   to 25: Nelder-Mead on one ratio per step after the first by which the prediction the
   solver receives is extrapolated from the previous knot's (``D_k + c_k (D_k -
   D_{k-1})``; :class:`dpmsolver.compensation.Compensation`, DC-Solver's dynamic
   compensation, Zhao et al. 2024, at first degree), each within 0.5
   (``TuneOptions.compensation_runs``); with more than 9 ratios, 9 values spread evenly
   over the steps and the ratios linear between them (``compensation_knots``). It costs
   no evaluation when sampling. Sigmas cannot carry it (the k-diffusion functions): tune
   with ``compensation_runs=0`` for them.
9. *(g) Correction of the data prediction* (``correction_components=4`` by default since
   stop 46, adopted by the rule in ``benchmarks/stage_g.md``; 0 turns it off), for the
   recipe chosen so far, at budgets up to 10:
   at each step's start the prediction moves by a few coordinates in the trajectory's
   principal directions (:class:`dpmsolver.correction.Correction`; PAS, Wang et al. 2025),
   fitted step by step by least squares on ``correction_rows`` calibration rows against
   their exact state at the step's end knot. Multistep deterministic recipes only; it
   costs no evaluation when sampling, and sigmas cannot carry it.
10. Otherwise the default recipe stays.
11. *Blow-up guard.* Each budget's final choice also runs from 512 noises of tune's own,
   with no reference; if more of its samples end beyond twice the largest pilot
   reference's norm than an earlier stage's choice sent there, the latest stage with the
   fewest is taken (``TuneOptions.guard_rows``). The held-out half sees a blow-up of 1-2
   samples in 512 (third-order UniPC at guidance 15, for one) too rarely to refuse it.
   (``TuneOptions.guard_rule``: studies that count on runs under the norm cap, or weigh the
   far samples' errors against the rest.)
   *Tail ranking* (``TuneOptions.tail_ranking``, factor 2 by default since stop 32). Stage
   (a)'s finalists also run from the guard's noises; where two end far apart there, the
   farthest rows get an exact reference and each finalist's mean squared error is
   estimated over the calibration rows and those rows; where the calibration ranking's
   first finalist's estimate is over 2x another's, the finalists are ranked by it: the
   calibration half misses a candidate's rare far samples as the held-out half does.
   *Tail check.* Where the final choice is a later stage's than (a), it and stage (a)'s
   recipe are compared on the guard's noises; where they end far apart, the farthest rows
   get an exact reference, and the one with the smaller mean squared error over the
   held-out and those rows is kept (``TuneOptions.tail_rows``): a fitted choice's rare far
   sample is what the 64 held-out rows miss. Where it refuses the final choice, the stages
   accepted between (a) and it are checked the same way, latest first, before stage (a)'s
   recipe is taken (``TuneOptions.tail_walk_back``).
12. *Norm cap.* What the guard's draw misses is bounded when sampling: along the reference
    solve the largest data-prediction norm is recorded per log-SNR bin, and the profile's
    recipes scale any sample's data prediction down to 3 times that envelope
    (``TuneOptions.norm_cap``; :class:`dpmsolver.guidance.NormCap`). A sample thrown off
    the data under strong guidance then comes back instead of diverging. It is applied
    after the choice, so it changes nothing tune chooses.
13. *Repeated calls.* A network call that repeats one made before (the same rows, knot and
    bit-identical states: the first step of every run on the same rows, stage (e)'s rerun
    of a recipe, the shared first knots of a fit's runs) is answered from memory
    (``TuneOptions.memo_mb``); the choices are the same, the evaluations fewer.

The result is a :class:`Profile`: per (guidance, budget) the chosen solver, its options and
the exact knots, with the calibration and held-out errors and the cost. Use it with
``sample(..., solver="auto", nfe=n, profile=profile)``, the diffusers scheduler
(``profile=``) or the k-diffusion functions (``profile.sigmas(n, guidance)``); save it with
:meth:`Profile.save`. Needs scipy (Nelder-Mead): ``pip install scipy``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._validate import check_choice, check_finite_float, check_int
from ._version import __version__
from .analytic import reference_solve
from .correction import MAX_COMPONENTS, CorrectionFit
from .denoiser import Denoiser, Network
from .guidance import NormCap
from .io import atomic_write_text
from .loop import NonFiniteError, solve
from .merge import CallMerger
from .parameterization import PREDICTIONS, Prediction
from .plan import Plan, lower_order_final_default, solver_orders, step_order
from .progress import Progress
from .recipe import PolicyRequest, Recipe, resolve
from .sampling import SampleOptions, build_denoiser
from .schedules import Knot, NoiseSchedule
from .solvers import AdaptiveSolver, MultistepSolver, Solver, StepContext, UniPC
from .steplimit import StepLimit, check_step_limit
from .timegrid import LEVEL_SPACED_KINDS, make_grid

if TYPE_CHECKING:  # the statistics' module loads lazily, where a tune uses them
    from .ems import EMS

__all__ = [
    "DEFAULT_BUDGETS",
    "PROFILE_FORMAT",
    "READABLE_FORMATS",
    "V3_CANDIDATES",
    "V3_NOISES",
    "V3_SEED",
    "BudgetChoice",
    "Profile",
    "ProfileMismatchError",
    "TuneOptions",
    "clear_gain",
    "grid_families",
    "no_new_divergence",
    "paired_better",
    "schedule_fingerprint",
    "tune",
    "v3_candidates",
]

PROFILE_FORMAT = "dpmsolver-profile/12"
#: Formats :meth:`Profile.load` reads: version 1 had no model-time shifts, version 2 no
#: ``lower_order_final``, version 3 no ``guard_refused``, version 4 no ``x0_norm_cap``,
#: version 5 no ``step_limit``, version 6 no ``compensation``, version 7 no ``correction``,
#: version 8 no ``sigma_max``, version 9 no DPM-Solver-v3 statistics in a choice's options,
#: version 10 no per-step ``orders``, version 11 no UniPC ``corrector_skip`` in a choice's
#: options (a library that reads 11 would fail on it).
READABLE_FORMATS: tuple[str, ...] = tuple(f"dpmsolver-profile/{v}" for v in range(1, 13))
#: Log-SNR bins of the pilot's envelope of data-prediction norms (:attr:`TuneOptions.norm_cap`).
CAP_BINS = 32
#: The guard noises' seed (:attr:`TuneOptions.guard_rows`): fixed, so that a profile does
#: not depend on the global generator.
GUARD_SEED = 0x6A4D
#: The seed of the noises DPM-Solver-v3's statistics are estimated on with
#: ``TuneOptions.v3_noise="own"`` (neither the pilot's nor the guard's).
V3_SEED = 0x3E35
#: Where DPM-Solver-v3's statistics come from (:attr:`TuneOptions.v3_noise`).
V3_NOISES = ("pilot", "own")
#: Which pilot rows rank stage (a)'s finalists (:attr:`TuneOptions.rank_rows`).
RANK_ROWS: tuple[str, ...] = ("calibration", "pilot", "worse")
#: How the blow-up guard picks among the stages' choices (:attr:`TuneOptions.guard_rule`).
GUARD_RULES: tuple[str, ...] = ("count", "capped", "mse")
#: The most guard rows beyond the bound that :attr:`TuneOptions.guard_rule` ``"mse"`` gives
#: an exact reference (the farthest first).
GUARD_REFERENCE_ROWS = 32
#: When the tail ranking runs (:attr:`TuneOptions.tail_trigger`).
TAIL_TRIGGERS: tuple[str, ...] = ("always", "disagree")
#: The budgets :func:`tune` fits by default.
DEFAULT_BUDGETS: tuple[int, ...] = (5, 6, 8, 10, 12, 15, 20, 25)

#: Candidates of stage (a): one configuration per deterministic method family and order.
TUNE_SOLVERS: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("ddim", {}),
    ("dpmpp_multistep", {"order": 2}),
    ("dpmpp_multistep", {"order": 3}),
    ("dpm_multistep", {"order": 2}),
    ("dpm_multistep", {"order": 3}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "form": "noise"}),
    ("unipc", {"order": 3, "form": "noise"}),
    ("deis", {"order": 3}),
    ("ipndm", {"order": 3, "coefficients": "fixed"}),
    ("ipndm", {"order": 4}),
    ("dpmpp_singlestep", {"order": 2}),
    ("dpmpp_fast", {"order": 3}),
    ("heun", {}),
    # third order with its last orders lowered at any step count (as diffusers' UniPC
    # does; by default only below 15 steps): candidates from 15 evaluations on
    ("unipc", {"order": 3, "lower_order_final": True}),
    ("dpmpp_multistep", {"order": 3, "lower_order_final": True}),
    ("deis", {"order": 3, "lower_order_final": True}),
)
#: Grid families of stage (a).
TUNE_GRIDS: tuple[tuple[str, float | None], ...] = (
    ("logsnr", None),
    ("time_uniform", None),
    ("time_quadratic", None),
    ("karras", 7.0),
)


class ProfileMismatchError(ValueError):
    """A profile was made for another schedule or prediction than it is used with."""


def schedule_fingerprint(schedule: NoiseSchedule) -> dict[str, Any]:
    """What identifies a schedule: its class, its time range, lambda and the network time on
    17 points of the range (compared with a tolerance by :func:`same_schedule`: a schedule
    rebuilt from a diffusers config in float32 is the same schedule), and a sha256 of both
    on 257 points (for display)."""
    ts = torch.linspace(schedule.t_min, schedule.t_max, 257, dtype=torch.float64)
    h = hashlib.sha256()
    for part in (
        torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64),
        schedule.lambda_(ts),
        schedule.model_time(ts),
    ):
        h.update(part.contiguous().numpy().tobytes())
    # the first point is the start: pure noise on rectified flow (lambda = -inf, kept as is)
    few = ts[::16]
    return {
        "type": type(schedule).__name__,
        "t_min": schedule.t_min,
        "t_max": schedule.t_max,
        "lambda": [float(v) for v in schedule.lambda_(few)],
        "model_time": [float(v) for v in schedule.model_time(few)],
        "sha256": h.hexdigest(),
    }


#: Tolerances of :func:`same_schedule`: float32 rebuilds differ by ~1e-5 in lambda.
_LAMBDA_ATOL, _TIME_RTOL = 1e-3, 1e-4


def same_schedule(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two :func:`schedule_fingerprint` s describe the same schedule: same class and
    time range, lambda within 1e-3 and network times within 1e-4 (relative) at the 17
    points. Fingerprints without the points (older profiles) compare by sha256."""
    if "lambda" not in a or "lambda" not in b:
        return bool(a["sha256"] == b["sha256"])
    if a["type"] != b["type"] or not all(
        math.isclose(a[k], b[k], rel_tol=_TIME_RTOL, abs_tol=1e-9) for k in ("t_min", "t_max")
    ):
        return False
    lam = all(
        x == y or abs(x - y) <= _LAMBDA_ATOL for x, y in zip(a["lambda"], b["lambda"], strict=True)
    )
    time = all(
        math.isclose(x, y, rel_tol=_TIME_RTOL, abs_tol=1e-6)
        for x, y in zip(a["model_time"], b["model_time"], strict=True)
    )
    return lam and time


def _rms(a: Tensor, b: Tensor) -> float:
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _norms(x: Tensor) -> Tensor:
    """Per-sample RMS norm (in float64)."""
    return x.double().flatten(1).pow(2).mean(1).sqrt()


def _per_sample(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample RMS error (inf where a sample is not finite)."""
    d = (a.double() - b.double()).flatten(1)
    err = d.pow(2).mean(1).sqrt()
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


def paired_better(new: Tensor, old: Tensor) -> bool:
    """Whether per-sample errors ``new`` improve on ``old`` for the same samples: a lower
    RMS and a lower median of the per-sample log-ratios (both, so neither a few samples nor
    a typical-sample gain that the RMS does not see decides alone)."""
    if not bool(torch.isfinite(new).all()):
        return False
    rms_new, rms_old = float(new.pow(2).mean().sqrt()), float(old.pow(2).mean().sqrt())
    ratios = torch.log(new.clamp_min(1e-300) / old.clamp_min(1e-300))
    return rms_new < rms_old and float(ratios.median()) < 0.0


def clear_gain(new: Tensor, old: Tensor, z: float) -> bool:
    """Whether the mean of the paired differences of squared errors ``old**2 - new**2`` is
    at least ``z`` standard errors above zero (``z = 0``: any gain in RMS). The held-out
    half judges every stage in turn, so a choice that wins there by chance is kept as often
    as the stages try; a threshold on the gain is the reusable holdout's remedy (Dwork et
    al., "The reusable holdout", Science 2015), here without its added noise."""
    if z == 0.0:
        return True
    d = (old.double().pow(2) - new.double().pow(2)).flatten()
    if d.numel() < 2 or not bool(torch.isfinite(d).all()):
        return False
    return float(d.mean()) > z * float(d.std()) / math.sqrt(d.numel())


def no_new_divergence(new: Tensor, old: Tensor, spread: float) -> bool:
    """Whether no sample diverges under ``new`` that ``old`` kept: per-sample errors
    ``new[i] <= max(spread, 2 old[i])``, ``spread`` being the data's (the RMS distance of
    the reference samples to their mean). A sample farther from its reference than the
    data's spread has left for another mode; one that ``old`` already sent at least half
    that far (a sample near a mode boundary, which most recipes send astray at high
    guidance) may end at most twice as far under ``new``, so that a recipe better on every
    other sample is not refused for landing a few percent farther on it (measured: on a
    guidance-15 flow mixture, UniPC at 10 NFE halved the held-out RMS error, 0.185 against
    0.354, and was refused for one sample at 1.43 where the default had it at 1.38, the
    spread being 1.41)."""
    if not bool(torch.isfinite(new).all()):
        return False
    return bool((new <= torch.clamp(2.0 * old, min=spread)).all())


# ----------------------------------------------------------------------------------------
# The profile
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetChoice:
    """What :func:`tune` chose for one guidance scale and budget.

    Attributes:
        nfe: the budget (network evaluations per sample).
        guidance_scale: the classifier-free guidance scale.
        solver, options: the solver (registry name) and its options (order included).
        grid, rho, sigma_end, final_step: the recipe's grid, as
            :class:`~dpmsolver.recipe.Recipe` (used when ``times`` is None).
        times: schedule times of the fitted noisy knots, first to last (None: the grid's);
            the run ends with the data-prediction step to sigma = 0.
        stage: what the choice came from: ``"default"``, ``"selection"``, ``"steps"``,
            ``"shifts"``, ``"orders"``, ``"compensation"`` or ``"correction"`` (stages (d)
            and (e) keep the stage they change).
        calibration_error, heldout_error: RMS error to the reference on the calibration and
            held-out halves of the pilot.
        default_heldout_error: the default recipe's held-out error, for comparison.
        evaluations, seconds: what tuning this budget cost (seconds of wall time, which
            budgets tuned side by side share: :func:`tune`'s ``workers``).
        model_shifts: stage (c)'s log-SNR offsets of the network's time per noisy knot
            (:attr:`~dpmsolver.recipe.Recipe.model_shifts`), or None.
        lower_order_final: the recipe lowers its last orders whatever the step count
            (:attr:`~dpmsolver.recipe.Recipe.lower_order_final`; None: the default rule).
        guard_refused: the stages whose choice the blow-up guard refused, latest first
            (:attr:`TuneOptions.guard_rows`; empty when it refused none).
        x0_norm_cap: the per-sample bound on the data prediction's norm the recipe samples
            with (:attr:`TuneOptions.norm_cap`; None: none).
        step_limit: the per-sample bound on each step's departure from the first-order
            step the recipe samples with (:attr:`TuneOptions.step_limit`; None: none).
        compensation: stage (f)'s ratios, one per step after the first
            (:attr:`~dpmsolver.recipe.Recipe.compensation`), or None.
        correction: stage (g)'s coordinates, one tuple per step
            (:attr:`~dpmsolver.recipe.Recipe.correction`), or None.
        sigma_max: the k-diffusion sigma where the grid's spacing starts after its first
            step (:attr:`~dpmsolver.recipe.Recipe.sigma_max`; :attr:`TuneOptions.flow_sigma_max`),
            or None.
        orders: stage (h)'s order of each step (:attr:`~dpmsolver.recipe.Recipe.orders`),
            or None.
    """

    nfe: int
    guidance_scale: float
    solver: str
    options: Mapping[str, Any]
    grid: str | None
    rho: float | None
    sigma_end: float | None
    final_step: str
    times: tuple[float, ...] | None
    stage: str
    calibration_error: float
    heldout_error: float
    default_heldout_error: float
    evaluations: int = 0
    seconds: float = 0.0
    model_shifts: tuple[float, ...] | None = None
    lower_order_final: bool | None = None
    guard_refused: tuple[str, ...] = ()
    x0_norm_cap: tuple[tuple[float, float], ...] | None = None
    step_limit: float | None = None
    compensation: tuple[float, ...] | None = None
    correction: tuple[tuple[float, ...], ...] | None = None
    sigma_max: float | None = None
    orders: tuple[int, ...] | None = None

    def recipe(self) -> Recipe:
        """The choice as a :class:`~dpmsolver.recipe.Recipe`."""
        return Recipe(
            self.solver,
            dict(self.options),
            grid=self.grid,  # type: ignore[arg-type]
            rho=self.rho,
            sigma_max=self.sigma_max,
            sigma_end=self.sigma_end,
            final_step=self.final_step,  # type: ignore[arg-type]
            timesteps=self.times,
            model_shifts=self.model_shifts,
            lower_order_final=self.lower_order_final,
            x0_norm_cap=self.x0_norm_cap,
            step_limit=self.step_limit,
            compensation=self.compensation,
            correction=self.correction,
            orders=self.orders,
        )


#: What a choice may carry that k-diffusion sigmas cannot (:meth:`Profile.sigmas` warns of
#: each): whether it does, what it does (``{final_step}``: the choice's), what the
#: k-diffusion functions do instead and who runs it as tuned, and the tune setting that
#: leaves it out (None: none does).
_NOT_IN_SIGMAS: tuple[tuple[Callable[[BudgetChoice], bool], str, str, str | None], ...] = (
    (
        lambda c: c.model_shifts is not None,
        "also moves the network's time at its knots (model_shifts, stage (c))",
        "they are dropped (the choice before stage (c)); dpmsolver.sample and the diffusers "
        "scheduler apply them",
        "shift_runs=0 (CLI: --shift-runs 0)",
    ),
    (
        lambda c: c.compensation is not None,
        "also compensates its data predictions (compensation, stage (f))",
        "they run without it; dpmsolver.sample and the diffusers scheduler apply it",
        "compensation_runs=0 (CLI: --compensation-runs 0)",
    ),
    (
        lambda c: c.correction is not None,
        "also corrects its data predictions (correction, stage (g))",
        "they run without it; dpmsolver.sample applies it",
        "correction_components=0 (CLI: --correction-components 0)",
    ),
    (
        lambda c: bool(c.lower_order_final),
        "lowers its last orders (lower_order_final)",
        "they keep the order to the end; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        None,
    ),
    (
        lambda c: c.orders is not None,
        "sets the order of each step (orders, stage (h))",
        "they keep their own; dpmsolver.sample and the diffusers scheduler run it as tuned",
        "order_search=False",
    ),
    (
        lambda c: bool(c.options.get("corrector_skip")),
        "leaves some steps' results uncorrected (UniPC's corrector_skip, stage (i))",
        "they correct after every step; dpmsolver.sample and the diffusers scheduler run it "
        "as tuned",
        "corrector_search=False",
    ),
    (
        lambda c: c.final_step != "denoise",
        "extrapolates its step into sigma = 0 (final_step={final_step!r})",
        "they end with the denoising step; dpmsolver.sample and the diffusers scheduler run "
        "it as tuned",
        "extrapolate_final=False",
    ),
)


@dataclass(frozen=True)
class Profile:
    """A sampler fitted to one model (:func:`tune`), per guidance scale and budget.

    Attributes:
        schedule: the schedule's fingerprint (:func:`schedule_fingerprint`).
        prediction: what the network predicts.
        choices: one :class:`BudgetChoice` per (guidance scale, budget).
        pilot: pilot noises used (half for calibration, half held out).
        reference_rtol, reference_error: the reference's tolerance and its estimated RMS
            error (the RMS difference to a solve at a 10x tighter tolerance, on
            ``check_rows`` of the pilot).
        evaluations, seconds: the whole tuning cost (reference included).
        library_version: the dpmsolver version that made it.
    """

    schedule: Mapping[str, Any]
    prediction: Prediction
    choices: tuple[BudgetChoice, ...]
    pilot: int
    reference_rtol: float
    reference_error: float
    evaluations: int
    seconds: float
    library_version: str = __version__
    format: str = PROFILE_FORMAT

    # -------------------------------------------------------------- use

    def check(self, schedule: NoiseSchedule, prediction: str) -> None:
        """Raise :class:`ProfileMismatchError` naming both sides unless this profile was
        made for ``schedule`` and ``prediction``."""
        theirs = schedule_fingerprint(schedule)
        if not same_schedule(theirs, self.schedule) or prediction != self.prediction:
            raise ProfileMismatchError(
                f"the profile was made for {self.schedule['type']} (sha256 "
                f"{self.schedule['sha256'][:12]}) with prediction={self.prediction!r}, but it is "
                f"used with {theirs['type']} (sha256 {theirs['sha256'][:12]}) with "
                f"prediction={prediction!r}; tune again for this model"
            )

    def choice(self, nfe: int, guidance_scale: float) -> BudgetChoice | None:
        """The choice for this budget and guidance scale, or None."""
        for c in self.choices:
            if c.nfe == nfe and math.isclose(c.guidance_scale, guidance_scale, rel_tol=1e-9):
                return c
        return None

    def recipe(
        self, nfe: int, guidance_scale: float, schedule: NoiseSchedule, prediction: str
    ) -> Recipe:
        """The recipe for ``nfe`` evaluations at ``guidance_scale`` on ``schedule``; where
        the profile has no such budget or guidance scale, the default policy's recipe with
        a warning naming what the profile holds."""
        self.check(schedule, prediction)
        c = self.choice(nfe, guidance_scale)
        if c is not None:
            return c.recipe()
        held = ", ".join(f"(w={x.guidance_scale:g}, nfe={x.nfe})" for x in self.choices)
        warnings.warn(
            f"the profile has no choice for nfe={nfe} at guidance {guidance_scale:g} (it holds "
            f"{held}); using the default solver='auto' recipe",
            stacklevel=3,
        )
        return resolve("auto", PolicyRequest(nfe, guidance_scale, schedule))

    def sigmas(self, nfe: int, guidance_scale: float, schedule: NoiseSchedule) -> list[float]:
        """The chosen knots as k-diffusion sigmas ``sigma / alpha``, ending with 0 (for the
        k-diffusion-style functions). Sigmas cannot carry a choice's model-time shifts
        (stage (c)): they are dropped with a warning, which leaves the choice stage (b) kept
        (tune with ``shift_runs=0`` to keep the profile's errors exact for these functions).
        Nor can they carry the choice's norm cap (:attr:`BudgetChoice.x0_norm_cap`) or step
        limit (:attr:`BudgetChoice.step_limit`), which bind on samples thrown off the data:
        those functions run without them. An extrapolated step into sigma = 0 (stage (e))
        they take as the denoising step, with a warning."""
        c = self.choice(nfe, guidance_scale)
        if c is None:
            raise KeyError(f"the profile has no choice for nfe={nfe}, guidance {guidance_scale:g}")
        for carries, what, then, leave_out in _NOT_IN_SIGMAS:
            if carries(c):
                tail = f", or tune with {leave_out} for these functions" if leave_out else ""
                does = what.format(final_step=c.final_step)
                warnings.warn(
                    f"the profile's choice for nfe={nfe} at guidance {guidance_scale:g} "
                    f"{does}, which the k-diffusion functions cannot carry: {then}{tail}",
                    stacklevel=2,
                )
        self.check(schedule, self.prediction)
        grid = c.recipe().plan(schedule, nfe=None if c.times else nfe).grid
        return grid.ksigmas

    # -------------------------------------------------------------- files

    def to_json(self) -> dict[str, Any]:
        """The profile as JSON-compatible data."""
        data = dataclasses.asdict(dataclasses.replace(self, choices=()))
        data["choices"] = [
            {
                **dataclasses.asdict(dataclasses.replace(c, options={})),
                "options": _options_json(c.options),
            }
            for c in self.choices
        ]
        return data

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save`; a clear error for a file that is not one,
        is damaged, or has another format version."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"profile {str(path)!r}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {str(path)!r} is not valid JSON ({e}); tune again") from None
        return cls.from_json(data, f"profile {str(path)!r}")

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> Profile:
        """A profile from :meth:`to_json`'s data; ``source`` names it in errors."""
        if not isinstance(data, Mapping) or data.get("format") not in READABLE_FORMATS:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"{source} has format {found!r}, expected {PROFILE_FORMAT!r}; "
                "tune again with this version"
            )

        def floats(v: Any) -> tuple[float, ...] | None:
            return None if v is None else tuple(float(x) for x in v)

        try:
            choices = tuple(
                BudgetChoice(
                    **{
                        **c,
                        "times": floats(c["times"]),
                        "model_shifts": floats(c.get("model_shifts")),
                        "guard_refused": tuple(str(v) for v in c.get("guard_refused", ())),
                        "x0_norm_cap": _pairs(c.get("x0_norm_cap")),
                        "compensation": floats(c.get("compensation")),
                        "correction": _rows_of(c.get("correction")),
                        "orders": _ints(c.get("orders")),
                        "options": _options_of(c["options"]),
                    }
                )
                for c in data["choices"]
            )
            return cls(**{**data, "format": PROFILE_FORMAT, "choices": choices})
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"{source} is damaged ({e}); tune again") from None


def _options_json(options: Mapping[str, Any]) -> dict[str, Any]:
    """A choice's solver options as JSON data: DPM-Solver-v3's statistics (an
    :class:`~dpmsolver.ems.EMS` under ``"ems"``) as their own JSON data."""
    from .ems import EMS

    return {k: v.to_json() if isinstance(v, EMS) else v for k, v in options.items()}


def _options_of(data: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`_options_json`'s inverse."""
    from .ems import EMS

    out = dict(data)
    if isinstance(out.get("ems"), Mapping):
        out["ems"] = EMS.from_json(out["ems"])
    if isinstance(out.get("corrector_skip"), list):  # JSON has no tuples
        out["corrector_skip"] = tuple(out["corrector_skip"])
    return out


def _pairs(v: Any) -> tuple[tuple[float, float], ...] | None:
    return None if v is None else tuple((float(a), float(b)) for a, b in v)


def _ints(v: Any) -> tuple[int, ...] | None:
    return None if v is None else tuple(int(x) for x in v)


def _rows_of(v: Any) -> tuple[tuple[float, ...], ...] | None:
    return None if v is None else tuple(tuple(float(x) for x in row) for row in v)


# ----------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneOptions:
    """Knobs of :func:`tune` (the defaults tune the built-in model, 128 pilot noises, one
    guidance scale and 8 budgets at guidance 3 on 2 shared CPU cores in 9.7 minutes at stop
    42; stop 41's code took 10.8 on that machine and 16.8 on its own, 1.6x slower one;
    benchmarks/tune_cost.md).

    Attributes:
        rtol: the reference's starting tolerance (tightened until its error is 10x below
            the best candidate's). Default 1e-3.
        check_rows: pilot rows on which the reference's error is estimated (a second solve
            at a 10x tighter tolerance; default 16).
        solvers: stage (a)'s candidates, ``(name, options)`` pairs (default
            :data:`TUNE_SOLVERS`); ``options`` may also hold the recipe's
            ``lower_order_final`` (such a candidate is screened only where the default rule
            keeps the last orders).
        grids: stage (a)'s grid families, ``(kind, rho)`` pairs (default :data:`TUNE_GRIDS`).
        flow_sigma_max: on a schedule that starts at pure noise (rectified flow), stage (a)
            also screens the grid families spaced in noise level with their spacing
            entered at this k-diffusion sigma after one step
            (:attr:`~dpmsolver.recipe.Recipe.sigma_max`), as k-diffusion's samplers run
            flow models (EDM's sigma_max, 80); the default grids start the spacing a
            thousandth below pure noise, at sigma ~1000. Default None: not. A study, not
            taken (stop 47, ``benchmarks/stage_a_sigma_max.md``): with 80, on the selection
            split's 11 flow problems at 5-25 NFE, 281 of 352 cells met the best peer on
            512 new noises instead of 280 and the changed cells' geo-mean fell 0.95x, but
            one cell got 6.6x worse (still 0.40x the peer), which the rule written before
            the run refused.
        v3_points: with ``n`` > 0, stage (a) also tries DPM-Solver-v3 (``dpmv3``; Zheng,
            Lu et al. 2023) on every grid family: :data:`V3_CANDIDATES`, with empirical
            model statistics (:func:`dpmsolver.ems.estimate_ems`) estimated per guidance
            scale over the calibration rows' own trajectories on ``n`` log-SNR points
            (:func:`_model_statistics`). Default 0: not. A study, not taken (stop 48,
            ``benchmarks/stage_a_v3.md``): with 100, on the selection problems at 5-15 NFE
            the pilot chose ``dpmv3`` in 308 of 672 cells, and 554 met the best peer on 512
            new noises instead of 576 (at half its error at guidance 7.5, 5-10 NFE: 60
            instead of 49).
        v3_noise: where those statistics come from: ``"pilot"`` (default: the calibration
            rows' trajectories, which then also rank the candidates, so ``dpmv3``'s
            calibration error is in sample) or ``"own"`` (as many noises of
            :data:`V3_SEED`, with the calibration rows' conditioning). A study, not taken
            (stop 49, ``benchmarks/stage_a_v3_own.md``): with ``"own"``,
            ``v3_min_guidance=5`` and ``v3_max_nfe=10``, on the selection problems at
            guidance 7.5 and 15, 5-10 NFE, 201 of 224 cells met the best peer on 512 new
            noises against 203 without ``dpmv3`` and 203 with ``"pilot"``.
        v3_min_guidance: guidance scales below this get no ``dpmv3`` candidates (and no
            statistics). Default 0.
        v3_max_nfe: budgets above this get no ``dpmv3`` candidates. Default None: every
            budget.
        screen_rows: calibration rows every candidate is screened on (default 8).
        finalists: candidates scored on every pilot row (default 4).
        rank_rows: the rows that rank the finalists: ``"calibration"`` (default: the
            calibration half) or ``"pilot"`` (every pilot row; the held-out half still
            decides on its own whether the winner beats the default). A study, not taken: on
            the 20 selection problems, stage (a) alone (every candidate's error on the 128
            pilot noises and on 512 new ones, 616 of the 640 cells; a scratch study, not a
            recorded benchmark) picked a candidate whose new-noise error was 1.36x the best
            candidate's (geometric mean) when ranked on the calibration half, 1.25x on the
            whole pilot and 1.20x with ``screen_rows=16`` too. The whole tune with both
            (``python -m dpmsolver.bench.tuned --no-cost --split selection --set
            "rank_rows='pilot'" --set screen_rows=16``) met the best peer in 553 of those
            640 cells instead of 542 (geo-mean 0.46 against 0.48). On the 8 fresh problems,
            which the choice never saw, it did not carry over: 213 of 256 cells met on the
            test set instead of 216, 205 instead of 204 on 512 new noises, and 3 cells over
            10x there instead of 1 (benchmarks/tuned_fresh_pooled.md). ``"worse"``: the
            larger of the two halves' RMS errors, so that a candidate whose error one
            half's few far samples carry ranks by that half; also a study, not taken: on
            the selection problems (before stage (e); ``--set "rank_rows='worse'" --set
            extrapolate_final=False``, benchmarks/tuned_selection_worse.md) it changed 82
            of 640 cells, 38 for the better and 44 for the worse, 543 met either way
            (geo-mean 0.468 against 0.466).
        fine_knots: knots of the dynamic-programming grid (default 48).
        fine_rows: calibration rows whose reference trajectories the dynamic programming
            runs on (default 8).
        refine_runs: sampler runs of the Nelder-Mead refinement per budget (default 40).
        refine_rows: calibration rows the refinement runs on (default 32).
        shift_runs: sampler runs of stage (c), the model-time shifts, per budget (default
            60; 0 skips it, for profiles the k-diffusion functions must read).
        shift_rows: calibration rows stage (c) runs on (default 16). On 32, tuning the
            built-in model took 10.4 minutes (before budgets ran side by side), and on the
            20 selection problems (``python -m dpmsolver.bench.tuned --no-cost --split
            selection --set shift_rows=32``) it met the best peer in 556 of 640 cells
            (16 rows: 545) but its worst cell went from 43.6x the best peer to 207x (a
            blow-up at guidance 15, 6 NFE): not taken.
        compensation_runs: sampler runs of stage (f), the prediction compensation, per
            budget (default 40; 0 skips it, for profiles the k-diffusion functions must
            read).
        compensation_rows: calibration rows stage (f) runs on (default 16).
        compensation_bound: the largest ratio's magnitude (default 0.5, a smooth clamp).
        compensation_max_nfe: the largest budget stage (f) runs at (default 25: adopted at
            5-10 evaluations at stop 34 and at 12-25 at stop 36, each by a rule written
            before its run on the selection problems, ``benchmarks/stage_f.md``).
        compensation_knots: the most free values stage (f) fits (default 9, the ratios of
            10 steps): with more steps the ratios are linear between this many values
            spread evenly over the steps, so that Nelder-Mead's runs can still move them.
        correction_components: coordinates per step of stage (g), the correction of the
            data prediction in the trajectory's principal directions (PAS; default 4,
            adopted at stop 46 by the rule in ``benchmarks/stage_g.md``; 0 turns the stage
            off). Multistep deterministic recipes only; sigmas cannot carry it (the
            k-diffusion functions): tune with 0 for them.
        correction_rows: calibration rows stage (g) fits on (default 32): each gets the
            exact state at the recipe's knots, a reference solve of its own.
        correction_max_nfe: the largest budget stage (g) runs at (default 10).
        order_search: stage (h), the order of each step (USF's per-step solver strategy,
            Liu et al. 2024, for the order alone): from the recipe after stage (e), each
            step in turn is tried at every lower order and the one with the smallest error
            on ``order_rows`` calibration rows kept (one greedy pass, no extra evaluation
            per step for a multistep solver); then the held-out half decides as for every
            stage. Stages (f) and (g) fit on its orders. Default False: on the selection
            problems at 5-10 NFE it met the best peer on 512 new noises in 397 of 448
            cells against 395, but left one fewer at half the peer's error, so the rule
            written before the run refused it (benchmarks/stage_h.md).
        order_rows: calibration rows stage (h) compares orders on (default 32).
        order_max_nfe: the largest budget stage (h) runs at (default 10).
        corrector_search: stage (i), which steps' results a UniPC recipe leaves
            uncorrected (``corrector_skip``, diffusers' ``disable_corrector``; USF's
            per-step strategy for the corrector): from the recipe after stage (h), each
            step whose result the next step corrects is tried uncorrected in turn and kept
            so where that lowers the error on ``corrector_rows`` calibration rows (one
            greedy pass, no evaluation either way); then the held-out half decides as for
            every stage. Stages (f) and (g) fit on it. Default False: on the selection
            problems at 5-10 NFE it met the best peer on 512 new noises in 397 of 448 cells
            against 395 (changed cells' geo-mean 0.964), which passed the rule written
            before the run, and the blind third round met the rule's condition (2 of 128
            cells changed, 112 met either way); but on the held-out problems, scored blind
            too, all 3 cells it changed got worse on the new noises (1.18-2.01x, 101 met
            against 100), so on the problems it never saw it made 4 of 5 changed cells
            worse, and it stays off (``benchmarks/stage_i.md``). Sigmas cannot carry it
            (the k-diffusion functions).
        corrector_rows: calibration rows stage (i) compares on (default 32).
        corrector_max_nfe: the largest budget stage (i) runs at (default 10).
        shift_bound: the largest shift, in log-SNR (default 0.1). Unbounded, the fit drove
            neighbouring shifts to large opposite values (-0.34, +0.39) that helped the
            pilot and sent test samples astray (on the selection problems: 4 cells worse
            by 2.6-5.5x; on held-out ones, seen later, one cell by 50x).
        step_bases: recipes whose knots start the time-step search (default 3).
        worst_factor: also refuse a choice whose worst held-out sample ends more than this
            factor farther from its reference than under the current choice (default None:
            no such check). A study of tail risk: on the 20 selection problems
            (``python -m dpmsolver.bench.tuned --no-cost --split selection --set
            worst_factor=1.0``) 1.0 cut the worst cell from 43.6x the best peer to 16.3x,
            but met the best peer in 529 of 640 cells instead of 545 (geo-mean 0.50
            against 0.48), and left as many cells whose test error is over 3x their
            pilot error (51): it refuses gains without removing the test-only blow-ups.
        accept_z: the held-out half keeps a stage's choice only where its gain in mean
            squared error is at least this many standard errors of the paired differences
            (:func:`clear_gain`; default 0.0: any gain, as :func:`paired_better` alone).
            A study of the held-out half's reuse across the stages: at 1.0, on the selection
            problems at 5-10 NFE, 396 of 448 cells met the best peer on 512 new noises
            against 395, the 133 changed cells 1.5% worse on the geometric mean; refused
            by the rule written before the run (benchmarks/accept_z.md).
        probe_pairs, probe_levels: boundary probes (default 0 pairs: none; 6 levels). With
            ``probe_pairs`` > 0, the held-out pairs (of consecutive held-out rows) whose
            references lie farthest apart are bisected on the arc ``cos(theta) a +
            sin(theta) b`` (every point of which is distributed as a pilot noise) towards
            the reference's jump between modes, ``probe_levels`` times, and a choice is
            refused that sends more of those arcs across the boundary than the current one
            (by more than two of the finest probes): an estimate of the share of samples
            that change mode, which 64 held-out rows rarely see. A study: on the 20
            selection problems (``--set probe_pairs=8``) it changed 23 of 640 cells, 16 of
            them for the worse; 543 met the best peer (545 without), the worst cell stayed
            43.6x. The blow-ups it was meant to catch come from test samples whose mode
            boundaries the pilot's pairs do not cross.
        step_ratio: the most a fitted step (stage (b), in log-SNR) may grow over the step
            before it, for multistep solvers of order 2 and up (default 3.0; None: no
            bound). Their
            higher-order term divides the last two model outputs' difference by the step
            ratio ``r = h_prev / h``, so a short step followed by a long one amplifies that
            difference by ``1/r``: on a guidance-15 mixture (lowrank32-sd, 15 NFE) fitted
            knots that grew a step 6.8x sent 1 of 512 new noises 590 away (the data's
            largest norm is 2.7), while the grids' own knots kept every sample within 1.8.
            The common grids' knots are not bounded by it.
        guard_rows, guard_factor: the blow-up guard (default 512 rows, factor 2; 0 rows:
            none). :func:`tune` draws ``guard_rows`` noises of its own (seed
            :data:`GUARD_SEED`, conditioning recycled from the pilot's rows) and runs each
            budget's final choice from them, with no reference: a sample whose RMS norm is
            over ``guard_factor`` times the largest of the pilot references' has left the
            data, whatever the exact solution is. If the choice sends more guard samples
            there than an earlier stage's choice of the same budget did, the latest stage
            with the fewest is taken instead (the default recipe is the first stage). The
            held-out rows see a blow-up of 2 samples in 512 (UniPC order 3 at guidance 15
            on lowrank32-sd: 500 away, the data's largest norm being 2.6) with
            probability 0.22; the guard's 512 rows with 0.87. It costs ``guard_rows``
            samples at each budget's NFE, and more only where it finds a blow-up.
        guard_rule: how the guard picks among the stages' choices where the latest sends
            more guard samples beyond the bound than an earlier one: ``"count"`` (default)
            takes the latest with the fewest; ``"capped"`` does so with the guard's noises
            run under the norm cap the profile samples with (:attr:`norm_cap`; the tail
            ranking and the tail check see those capped runs too); ``"mse"`` runs them so
            too, gives the guard rows beyond the bound under any of the compared choices an
            exact reference (at most :data:`GUARD_REFERENCE_ROWS`, the farthest first), and
            takes the choice with the smallest mean squared error estimated over the
            held-out rows and the guard's (the latest of equals; the other guard rows count
            at each choice's held-out mean), as the tail check does. Why: the count refuses
            a recipe for one far sample in 512 however much better it is on the other 511,
            and the norm cap already bounds that sample when sampling: at guidance 15 and 15
            NFE on ill64-edm the fitted recipe's held-out error was 0.022 against the
            default DDIM's 0.73, with 2 guard samples beyond the bound (4.1-4.8 from the
            origin under the cap, 70 without; the bound 2.8), and the count took DDIM, 4.6x
            the best peer on the test set. A study, not taken (stop 50, rule written before
            the runs, benchmarks/guard_mse.md): on the selection problems at guidance 7.5
            and 15, 5-15 NFE (336 cells, 512 new noises) ``"mse"`` met the best peer in 292
            cells and ``"capped"`` in 291, against 293; each sent two cells to DDIM (one
            0.29x -> 2.35x), where a capped guard run left a sample beyond the bound.
        guard_fallback: where the guard refuses every stage's choice back to the default
            recipe, take instead stage (a)'s first finalist (in its ranking) that the
            held-out half takes over the default and that sends no more guard samples beyond
            the bound than the default does (default False: the default recipe). The tail
            ranking has already run every finalist from the guard's noises, so it costs no
            evaluation. Why: on ill128-flow at guidance 7.5 and 6 NFE (third fresh round)
            stage (a)'s pick sent 3 guard samples beyond the bound and the default DDIM 1,
            so the guard took DDIM (held-out 0.77, 1.82x the best peer on the new noises)
            while the second finalist (DPM-Solver-fast on the time-uniform grid) had
            held-out 0.41 and 1 such sample; on iso4-flow at guidance 15 and 10 NFE the
            fourth finalist had none and held-out 0.32 against DDIM's 0.43 (1.42x). A
            study, not taken (stop 50, benchmarks/guard_fallback.md): on the same 336
            selection cells it changed one, 1.15x worse on the new noises.
        norm_cap: the profile's recipes bound each sample's data prediction at this
            factor times the largest norm the pilot's exact guided trajectories reach near
            the same log-SNR (:class:`~dpmsolver.guidance.NormCap`, envelope of
            :data:`CAP_BINS` bins, each widened to its neighbours; default 3; None: no
            bound). It is applied when sampling with the profile, not while tuning, so
            it does not change what is chosen. It targets the rare single samples that a
            large step throws off the data under strong guidance, which then diverge
            (a sample 1865 away at guidance 15 and 6 NFE, 470 away at guidance 7.5 and 25
            NFE, where the data's norms are about 3 to 11). The factor is not fitted: 1.5
            was set first, and on the held-out problems' new noises it bound on a sample
            that was no blow-up (ill16-cos at guidance 1, whose exact norm is 1.6x the
            largest of the pilot's: a heavy tail), costing up to 11x there; 3 leaves twice
            that margin.
        step_limit: stage (d) tries the chosen recipe with each sample's step held within
            this factor of its first-order step (:class:`~dpmsolver.steplimit.StepLimit`;
            default 2; None: no stage (d)) and keeps it if the held-out half takes it. The
            factor is set, not fitted: where a held-out problem's sample diverged (guidance
            7.5, 25 NFE, third-order UniPC) its correction was 2.73 times its first-order
            step and the other 511 samples' at most 1.47; yet at guidance 15 on a flow
            problem legitimate corrections reach 4.4, and a limit of 2 there doubled the
            error at 15-20 NFE. Hence a stage, not a rule.
        extrapolate_final: stage (e) tries the chosen recipe with the extrapolated step
            into sigma = 0 (``final_step="extrapolate"``, :class:`~dpmsolver.loop.FinalStep`)
            and keeps it if the held-out half takes it (default True; False: no stage (e)).
            On the 20 selection problems it changed 225 of 640 cells, 175 for the better
            (iso256-sd at guidance 15 and 10 NFE 0.65x -> 0.33x the best peer) and 50 for
            the worse (by at most 1.17x); 544 met instead of 543, geo-mean 0.462 against
            0.466. The k-diffusion functions cannot take it (:meth:`Profile.sigmas` warns).
        tail_rows, tail_factor: the tail check (default 8 rows, factor 2; ``tail_rows=0``: none;
            it needs the guard's noises). The pilot's 64 held-out rows miss a choice's rare far
            samples: on a selection problem (iso1024-flow3, guidance 3, 25 NFE) the fitted choice
            was 2x more accurate than the stage (a) recipe on the typical sample but sent 1 of 64
            test noises (3 of 512 new ones) 0.05 away, 270x its median error, where the stage (a)
            recipe kept it at 3e-4. So the final choice and stage (a)'s (the default's if stage
            (a) kept none) both run from the guard's noises; where they end farther apart than
            ``tail_factor`` times the largest sum of their errors on a held-out row, the
            ``tail_rows`` farthest of those guard rows get an exact reference (kept for every
            budget) and both choices' errors there. Each choice's mean squared error over the
            held-out and the guard rows is then estimated (the rows without a reference at its
            held-out mean) and the smaller one is taken. Neither number was fitted. On the 20
            selection problems' test sets it changed 49 of 640 cells, 18 for the better and 31
            for the worse (541 met instead of 544). Re-scored on 512 new noises
            (``benchmarks/tuned_selection_tail_rescore.md``, the 248 cells of the pairs it
            touched) it met 170 instead of 161, geo-mean of the changed cells 0.869 against
            1.040: the 64 test samples miss the far samples it is about. Default since stop 30.
        tail_ranking: rank stage (a)'s finalists with the guard's noises too (a factor
            f >= 1, default 2.0; None: off; it needs ``tail_rows`` > 0 and the guard). Every
            finalist runs from the guard's noises; where two of them end farther apart than
            ``tail_factor`` times the largest sum of their errors on a held-out row, the
            ``tail_rows`` farthest guard rows get an exact reference and each finalist's mean
            squared error is estimated over the calibration rows and those (as the tail
            check does over the held-out rows); the held-out half stays the independent
            check. With f = 1 the finalists are ranked by that estimate; with f > 1 the
            calibration ranking is kept unless the estimate puts its first finalist's RMS
            error over f times another's. On iso8-flow at guidance 1 and 10 NFE the
            calibration half ranked second-order DPM-Solver++ first (8.0e-3 against UniPC
            order 2's 1.2e-2); on 512 new noises 4 samples carry 87% of its squared error and
            it has 4.3x UniPC's error (a hand diagnosis): the 64 calibration rows held none
            of them, the guard's 512 hold them, and with f = 1 tune takes UniPC. A study,
            not taken: stage (a) alone on the 20 selection problems, each pick scored on 512
            new noises
            (``benchmarks/stage_a_study.py``, benchmarks/stage_a_selection.md): f = 1 changed
            45 of 640 picks, 18 for the better (four by 11-230x: blow-ups avoided) and 27 for
            the worse (1.01-3.2x); geo-mean 0.983 over the 640. f = 2 (``tail_factor``'s 2,
            not fitted) kept those four gains and changed 22 picks, 11 for the better and 11
            for the worse (1.01-3.2x); geo-mean 0.980. The rule written before the runs asked
            for more cells better than worse: neither was taken at stop 31. Weighed by the
            worst case (stop 32; the rule written after those summaries were seen): of the
            69 picks the arms make differently, f = 2 puts 5 over twice the best finalist's
            error and none over 4x, against 9 and 5 ranked by calibration error (f = 1: 6
            and 0; geo-mean 0.983; ``stage_a_study.py --tail-counts``), so f = 2 is the
            default. Scored blind (benchmarks/tuned_tailrank_blind.md): it
            changed 4 fresh and 11 held-out cells; met on the 512 new noises 206 and 181
            instead of 207 and 180, on the test sets 215 and 197 instead of 216 and 199.
        micro_batch: at most this many samples per network call (both halves of each under
            classifier-free guidance, so twice as many rows); default None: the whole batch
            a stage evaluates (up to the 512 guard rows) in one call. Set it for a network
            whose activations for that batch do not fit the device's memory. A row's output
            may differ in its last bits with the rows beside it in the call (networks are not
            batch-invariant), so a choice that was a near tie may go the other way.
        merge_lanes: with N > 0, every budget is tuned side by side in N lanes, and the
            network calls of a lane's budgets run merged (:class:`dpmsolver.merge.CallMerger`:
            each call waits until every budget of its lane is waiting, then all run as one
            call, each row at its own time); with one lane the merged calls run on the
            process's intra-op threads, with more on one each. Most stages call the network
            on 8-35 samples, which costs more per row than a call on hundreds. Default None:
            one lane per intra-op thread on a CPU with two or more of them, none (off)
            otherwise (not measured on a GPU). Off with ``micro_batch`` set, or with fewer
            ``workers`` than budgets. On 2 CPUs the cost run (benchmarks/tune_cost.md) took
            9.5 min with 2 lanes against 10.8 without, with the same choices and held-out
            errors at all 8 budgets. A merged row's output may differ from the row called
            alone in its last bits (as with ``micro_batch``), so a near tie may go the other
            way.
        memo_mb: memory (MiB, per budget tuned side by side) for answering a network call
            that repeats one made before (the same rows, knot and bit-identical states)
            without the network; 0 turns it off. The choices are the same either way; only
            the evaluations counted and the time change. Default 256. A model whose calls
            must all reach it (hooks that record activations) needs 0.
        tail_trigger: when the tail ranking runs: ``"always"`` (default) or
            ``"disagree"``: only where the held-out half puts another finalist before the
            calibration ranking's first (RMS error over the live finalists), so that where
            the two halves agree the other finalists' guard runs are not paid for. A study,
            not taken (stop 33; rule written before it ran): on stage (a) alone over the 20
            selection problems the halves disagree in 252 of 640 cells, and it let through
            2 picks over 4x the best finalist (233x and 11.6x) that ``"always"`` ranks
            away, geo-mean 0.987 against 0.980 (benchmarks/stage_a_trigger.md): there both
            halves miss the rare sample, the case the ranking is for.
        tail_walk_back: where the tail check refuses the final choice, also check the
            stages accepted between stage (a) and it, latest first, and keep the first that
            the check keeps against stage (a)'s and that the guard sees blow up no more
            samples than the final choice (default True; False goes straight back to stage
            (a)'s). In both blind runs of stage (f) at 12-25 evaluations (stop 36,
            ``benchmarks/stage_f.md``) the worst cell was the check refusing the compensated
            recipe and taking stage (a)'s, 11x worse than the fitted recipe before (f). On
            the selection problems, by a rule written before the runs
            (``benchmarks/tail_walk_back.md``), it changed 8 of 320 cells at 12-25
            evaluations (geo-mean 0.83 on 512 new noises, the most 2.04x worse) and 6 of 320
            at 5-10 (geo-mean 0.90, the most 1.14x worse), the cells meeting the best peer
            and at half its error unchanged; the default since stop 37, then scored blind.
        tail_accept: stage (a) takes a finalist over the current choice (the default
            recipe) as the tail check does (default False: by the held-out half alone): where
            the two end far apart on a guard row, by the mean squared error estimated over
            the held-out rows and the guard's, no held-out sample newly diverging; elsewhere
            by the held-out half. Why: the tail check compares the later stages' choice with
            stage (a)'s, but nothing compares stage (a)'s with the default on the guard's
            rows, and the held-out half holds too few rare far samples to see them (on
            iso2-sd at guidance 7.5 and 20 NFE it took third-order DPM-Solver over the
            default, whose mean squared error estimated over pilot and guard rows was about
            27x smaller, by a hand diagnosis; on 512 new noises
            the pick was 4.7x the best peer, five samples carrying 98% of its squared error,
            benchmarks/miss_tails.md). A study, refused (stop 52, rule written before the
            runs, benchmarks/tail_accept.md): on the selection problems at guidance 1-15
            and 5-15 NFE (672 cells, 512 new noises) it met the best peer in 582 cells
            against 576 (31 changed, geo-mean 0.992), but made two cells over 4x worse
            against one over 4x better: at guidance 15 on lowrank512-sd every recipe blows
            up on the guard's uncapped runs, which the norm cap bounds when sampling.
        tail_accept_capped: :attr:`tail_accept`'s estimate reads the guard's runs made under
            the norm cap the profile samples with (:attr:`norm_cap`), as the profile
            samples (default False: the guard's uncapped runs; needs ``tail_accept``). The
            guard's count, tail ranking and tail check keep their runs. Why: both of
            tail_accept's over-4x losses were cells where every recipe blows up on the
            guard's uncapped runs and the cap bounds those blow-ups when sampling. A study,
            refused (stop 53, rule written before the runs,
            benchmarks/tail_accept_capped.md): on the same 672 selection cells it met the
            best peer in 581 against 576 (22 changed, geo-mean 0.891, none over 4x either
            way), but the cells at half the peer fell from 325 to 323.
        sample_options: denoiser options (thresholding, model_kwargs, ...).
    """

    rtol: float = 1e-3
    check_rows: int = 16
    solvers: tuple[tuple[str, Mapping[str, Any]], ...] = TUNE_SOLVERS
    grids: tuple[tuple[str, float | None], ...] = TUNE_GRIDS
    flow_sigma_max: float | None = None
    v3_points: int = 0
    v3_noise: str = "pilot"
    v3_min_guidance: float = 0.0
    v3_max_nfe: int | None = None
    screen_rows: int = 8
    finalists: int = 4
    rank_rows: str = "calibration"
    fine_knots: int = 48
    fine_rows: int = 8
    refine_runs: int = 40
    refine_rows: int = 32
    shift_runs: int = 60
    shift_rows: int = 16
    shift_bound: float = 0.1
    compensation_runs: int = 40
    compensation_rows: int = 16
    compensation_bound: float = 0.5
    compensation_max_nfe: int = 25
    compensation_knots: int = 9
    correction_components: int = 4
    correction_rows: int = 32
    correction_max_nfe: int = 10
    order_search: bool = False
    order_rows: int = 32
    order_max_nfe: int = 10
    corrector_search: bool = False
    corrector_rows: int = 32
    corrector_max_nfe: int = 10
    step_bases: int = 3
    worst_factor: float | None = None
    accept_z: float = 0.0
    probe_pairs: int = 0
    probe_levels: int = 6
    step_ratio: float | None = 3.0
    guard_rows: int = 512
    guard_factor: float = 2.0
    norm_cap: float | None = 3.0
    step_limit: float | None = 2.0
    extrapolate_final: bool = True
    tail_rows: int = 8
    tail_factor: float = 2.0
    tail_ranking: float | None = 2.0
    tail_trigger: str = "always"
    guard_rule: str = "count"
    guard_fallback: bool = False
    tail_walk_back: bool = True
    tail_accept: bool = False
    tail_accept_capped: bool = False
    micro_batch: int | None = None
    merge_lanes: int | None = None
    memo_mb: int = 256
    sample_options: SampleOptions | None = None

    def __post_init__(self) -> None:
        check_finite_float("rtol", self.rtol, positive=True)
        check_int("check_rows", self.check_rows, minimum=1)
        if self.flow_sigma_max is not None:
            check_finite_float("flow_sigma_max", self.flow_sigma_max, positive=True)
        check_int("v3_points", self.v3_points, minimum=0)
        if 0 < self.v3_points < 8:
            raise ValueError(f"v3_points must be 0 (off) or at least 8, got {self.v3_points}")
        check_choice("v3_noise", self.v3_noise, V3_NOISES)
        check_finite_float("v3_min_guidance", self.v3_min_guidance)
        if self.v3_max_nfe is not None:
            check_int("v3_max_nfe", self.v3_max_nfe, minimum=1)
        check_int("screen_rows", self.screen_rows, minimum=1)
        check_int("finalists", self.finalists, minimum=1)
        check_choice("rank_rows", self.rank_rows, RANK_ROWS)
        check_int("fine_knots", self.fine_knots, minimum=4)
        check_int("fine_rows", self.fine_rows, minimum=1)
        check_int("refine_runs", self.refine_runs, minimum=0)
        check_int("refine_rows", self.refine_rows, minimum=1)
        check_int("shift_runs", self.shift_runs, minimum=0)
        check_int("shift_rows", self.shift_rows, minimum=1)
        check_finite_float("shift_bound", self.shift_bound, positive=True)
        check_int("compensation_runs", self.compensation_runs, minimum=0)
        check_int("compensation_rows", self.compensation_rows, minimum=1)
        check_finite_float("compensation_bound", self.compensation_bound, positive=True)
        check_int("compensation_max_nfe", self.compensation_max_nfe, minimum=1)
        check_int("compensation_knots", self.compensation_knots, minimum=2)
        check_int("correction_components", self.correction_components, minimum=0)
        if self.correction_components > MAX_COMPONENTS:
            raise ValueError(
                f"correction_components must be 0 to {MAX_COMPONENTS}, "
                f"got {self.correction_components}"
            )
        check_int("correction_rows", self.correction_rows, minimum=1)
        check_int("correction_max_nfe", self.correction_max_nfe, minimum=1)
        check_choice("order_search", self.order_search, (True, False))
        check_int("order_rows", self.order_rows, minimum=1)
        check_int("order_max_nfe", self.order_max_nfe, minimum=1)
        check_choice("corrector_search", self.corrector_search, (True, False))
        check_int("corrector_rows", self.corrector_rows, minimum=1)
        check_int("corrector_max_nfe", self.corrector_max_nfe, minimum=1)
        check_int("step_bases", self.step_bases, minimum=1)
        if self.worst_factor is not None:
            check_finite_float("worst_factor", self.worst_factor, positive=True)
        check_finite_float("accept_z", self.accept_z)
        if self.accept_z < 0.0:
            raise ValueError(f"accept_z must be >= 0, got {self.accept_z}")
        check_int("probe_pairs", self.probe_pairs, minimum=0)
        check_int("probe_levels", self.probe_levels, minimum=1)
        if self.step_ratio is not None:
            check_finite_float("step_ratio", self.step_ratio, positive=True)
            if self.step_ratio < 1.0:
                raise ValueError(f"step_ratio must be >= 1 or None, got {self.step_ratio}")
        check_int("guard_rows", self.guard_rows, minimum=0)
        check_finite_float("guard_factor", self.guard_factor, positive=True)
        if self.guard_factor <= 1.0:
            raise ValueError(f"guard_factor must be > 1, got {self.guard_factor}")
        if self.norm_cap is not None:
            check_finite_float("norm_cap", self.norm_cap, positive=True)
            if self.norm_cap < 1.0:
                raise ValueError(f"norm_cap must be >= 1 or None, got {self.norm_cap}")
        check_step_limit(self.step_limit)
        check_choice("extrapolate_final", self.extrapolate_final, (True, False))
        check_choice("tail_walk_back", self.tail_walk_back, (True, False))
        check_choice("tail_accept", self.tail_accept, (True, False))
        check_choice("tail_accept_capped", self.tail_accept_capped, (True, False))
        if self.tail_accept_capped and not self.tail_accept:
            raise ValueError(
                "tail_accept_capped=True needs tail_accept=True, got tail_accept=False"
            )
        check_int("tail_rows", self.tail_rows, minimum=0)
        check_finite_float("tail_factor", self.tail_factor, positive=True)
        if self.tail_ranking is not None:
            check_finite_float("tail_ranking", self.tail_ranking, positive=True)
            if self.tail_ranking < 1.0:
                raise ValueError(f"tail_ranking must be >= 1 or None, got {self.tail_ranking}")
        check_choice("tail_trigger", self.tail_trigger, TAIL_TRIGGERS)
        check_choice("guard_rule", self.guard_rule, GUARD_RULES)
        check_choice("guard_fallback", self.guard_fallback, (True, False))
        if self.micro_batch is not None:
            check_int("micro_batch", self.micro_batch, minimum=1)
        check_int("memo_mb", self.memo_mb, minimum=0)
        if self.merge_lanes is not None:
            check_int("merge_lanes", self.merge_lanes, minimum=0)


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
    ) -> Tensor | None:
        """The recipe's final samples from ``x_T`` under ``den``; None if it cannot spend
        exactly ``nfe``. ``fit``: a stage (g) fit run in place of the recipe's correction."""
        plan = self.plan(recipe, nfe)
        if plan is None:
            return None
        try:
            limit = None if recipe.step_limit is None else StepLimit(recipe.step_limit)
            return solve(
                den,
                x_T,
                plan,
                check_finite="off",
                final_step=recipe.final_step,
                step_limit=limit,
                compensation=recipe.compensation,
                correction=recipe.correction if fit is None else fit,
            ).x
        except NonFiniteError:  # pragma: no cover - check_finite="off" does not raise
            return None

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
    # the norm cap the guard's runs sample with (TuneOptions.guard_rule "capped" and "mse";
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
        from .analytic import exact_sample

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
    from .analytic import exact_sample

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


def tune(
    model: Network,
    noise: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction: Prediction = "eps",
    cond: Mapping[str, Any] | None = None,
    uncond: Mapping[str, Any] | None = None,
    guidance_scale: float | Sequence[float] = 1.0,
    nfe: Sequence[int] = DEFAULT_BUDGETS,
    progress: bool = False,
    workers: int | None = None,
    **options: Any,
) -> Profile:
    """Fit the sampler to ``model`` on the pilot ``noise`` (module docstring).

    Args:
        model: the network, ``model(x, t, **kwargs) -> output``.
        noise: the pilot batch of standard normal noises in the network's dtype (at least
            4; 128 is a good size), with ``cond``/``uncond`` rows aligned to it as in
            :func:`dpmsolver.sample`.
        schedule, prediction, cond, uncond: as in :func:`dpmsolver.sample`.
        guidance_scale: one classifier-free guidance scale or several (each is tuned).
        nfe: the budgets to tune (default 5, 6, 8, 10, 12, 15, 20, 25).
        progress: show a progress bar.
        workers: budgets tuned side by side, each in its own Python thread with every
            operation on one intra-op thread (the process's intra-op thread count is set
            to 1 meanwhile and restored after). The default is every budget where the
            network calls are merged (:attr:`TuneOptions.merge_lanes`, by default on a CPU
            with two or more intra-op threads), else the intra-op thread count
            (:func:`torch.get_num_threads`) on CPU and 1 elsewhere. Fewer workers than
            budgets turn the merging off. Each budget's result does not depend on it, up
            to the merged calls' rounding; only the time does. On 2 cores, small pilot
            subsets run about 1.3x faster side by side than on two intra-op threads,
            because one network call on 16-64 rows keeps a second intra-op thread mostly
            waiting. The model is then called from several threads at once: pass
            ``workers=1`` for a model that keeps state between calls (caches, hooks that
            record activations).
        **options: :class:`TuneOptions` fields (``rtol``, ``solvers``, ``grids``,
            ``screen_rows``, ``finalists``, ``fine_knots``, ``refine_runs``,
            ``micro_batch``, ``sample_options``, ...).

    Returns:
        A :class:`Profile`.
    """
    opts, budgets, scales = _arguments(noise, schedule, prediction, guidance_scale, nfe, options)
    cpu = noise.device.type == "cpu"
    lanes = opts.merge_lanes
    if lanes is None:
        lanes = torch.get_num_threads() if cpu and torch.get_num_threads() > 1 else 0
    if opts.micro_batch is not None:
        lanes = 0
    if workers is None:
        workers = len(budgets) if lanes else torch.get_num_threads() if cpu else 1
    workers = min(check_int("workers", workers, minimum=1), len(budgets))
    merging = lanes > 0 and workers == len(budgets) > 1
    sample_options = opts.sample_options or SampleOptions()
    if sample_options.model_dtype is None:
        # the pilot's dtype is the network's; the tuning arithmetic runs in float64
        sample_options = dataclasses.replace(sample_options, model_dtype=noise.dtype)
    t0 = time.perf_counter()
    rows = 0
    choices: list[BudgetChoice] = []
    rtol, ref_error = 0.0, 0.0  # the loosest final tolerance of the guidance scales
    with Progress(len(scales) * (1 + len(budgets)), enabled=progress, desc="tuning") as bar:
        for w in scales:
            merger = None
            if merging:
                merger = CallMerger(model, _end_times(schedule), _lanes(budgets, lanes))
            net = merger or model
            den = _Counter(
                _RowDenoiser(net, prediction, cond, uncond, w, sample_options, opts.micro_batch),
                opts.memo_mb,
            )
            prob = _pilot(
                den,
                schedule,
                noise,
                opts.rtol,
                opts.check_rows,
                opts.fine_knots,
                opts.fine_rows,
                (opts.probe_pairs, opts.probe_levels),
                (opts.guard_rows, opts.guard_factor),
            )
            if opts.guard_rule != "count" and prob.guard is not None:
                prob.guard.cap = prob.norm_cap(opts.norm_cap)
            if opts.tail_accept_capped and prob.guard is not None:
                prob.guard.accept_cap = prob.norm_cap(opts.norm_cap)
            bar.update()
            wopts = opts
            if opts.v3_points and w >= opts.v3_min_guidance:
                # the network itself, not the merger: these calls belong to no budget's lane
                ems, spent = _model_statistics(
                    _RowDenoiser(
                        model, prediction, cond, uncond, w, sample_options, opts.micro_batch
                    ),
                    prob,
                    budgets,
                    opts,
                )
                wopts = dataclasses.replace(opts, solvers=(*opts.solvers, *v3_candidates(ems)))
                rows += spent
            found = _tune_budgets(prob, budgets, w, wopts, workers, bar, merger)
            # The reference's own error must be 10x below the best choice's: else tighten it
            # and score the choices again against the tighter one.
            for _ in range(3):
                best = min(c.heldout_error for c in found)
                if prob.ref_error <= 0.1 * best or not math.isfinite(best):
                    break
                prob = _pilot(den, schedule, noise, prob.rtol / 10, opts.check_rows, 0)
                found = [_rescore(prob, c) for c in found]
            cap = prob.norm_cap(opts.norm_cap)
            choices += [dataclasses.replace(c, x0_norm_cap=cap) for c in found]
            rtol, ref_error = max(rtol, prob.rtol), max(ref_error, prob.ref_error)
            rows += den.rows + sum(c.evaluations for c in found)
            rows += 0 if merger is None else merger.extra_rows
    return Profile(
        schedule=schedule_fingerprint(schedule),
        prediction=prediction,
        choices=tuple(choices),
        pilot=int(noise.shape[0]),
        reference_rtol=rtol,
        reference_error=ref_error,
        evaluations=rows,
        seconds=time.perf_counter() - t0,
    )


#: DPM-Solver-v3's stage (a) candidates (:attr:`TuneOptions.v3_points`): the official
#: settings under guidance (order 2, no corrector from guidance 5 on), order 2 with its
#: pseudo-order corrector (the official setting below guidance 5), and order 3 with it.
V3_CANDIDATES: tuple[Mapping[str, Any], ...] = (
    {"order": 2, "corrector": "off"},
    {"order": 2, "corrector": "pseudo"},
    {"order": 3, "corrector": "pseudo"},
)


def v3_candidates(ems: EMS) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    """Stage (a)'s DPM-Solver-v3 candidates with the statistics ``ems``."""
    return tuple(("dpmv3", {"ems": ems, **o}) for o in V3_CANDIDATES)


def _model_statistics(
    den: _RowDenoiser, prob: _Problem, budgets: Sequence[int], opts: TuneOptions
) -> tuple[EMS, int]:
    """DPM-Solver-v3's empirical model statistics of the guided denoiser ``den`` over the
    calibration rows' own trajectories, or with ``opts.v3_noise == "own"`` over those of
    as many noises of :data:`V3_SEED` with the same rows' conditioning
    (:func:`dpmsolver.ems.estimate_ems` with ``noise=``,
    Zheng, Lu et al. 2023, App. C.1.1; trajectory statistics because under guidance the
    ODE's states are not noised data), on ``opts.v3_points`` log-SNR points, and the rows
    the network evaluated. The grid spans the schedule; where it starts at pure noise
    (lambda = -inf), from 2 below the lowest finite log-SNR of any stage (a) grid or the
    dynamic programming's knots (dpmv3 steps out of pure noise at first order, without
    statistics)."""
    from .ems import estimate_ems

    sched = prob.schedule
    hi = sched.knot(sched.t_min).lam
    lo = sched.knot(sched.t_max).lam
    if sched.starts_at_pure_noise:
        lams = [k.lam for k in _fine_knots(sched, opts.fine_knots)]
        for nfe in budgets:
            for kind, rho, sigma_max in grid_families(sched, opts):
                r = Recipe("ddim", grid=kind, rho=rho, sigma_max=sigma_max)  # type: ignore[arg-type]
                lams += [k.lam for k in r.plan(sched, nfe=nfe).grid.knots]
        lo = min(v for v in lams if math.isfinite(v)) - 2.0
    counter = _Counter(den, 0)  # no memo: the statistics differentiate the calls
    cal = prob.cal
    if opts.v3_noise == "own":
        noise = _seeded_noise(V3_SEED, len(cal), prob.x_T)
    else:
        noise = prob.x_T[cal] / sched.knot(sched.t_max).sigma
    ems = estimate_ems(
        _Rows(counter, cal),
        sched,
        noise=noise,
        prediction=str(den.args[1]),
        guidance_scale=float(den.args[4]),
        points=opts.v3_points,
        lam_range=(lo, hi),
        batch_size=len(cal),
        jvp="vjp",
    )
    return ems, counter.rows


def _tune_budgets(
    prob: _Problem,
    budgets: Sequence[int],
    w: float,
    opts: TuneOptions,
    workers: int,
    bar: Progress,
    merger: CallMerger | None = None,
) -> list[BudgetChoice]:
    """:func:`_tune_budget` for every budget, in ``budgets``' order; with ``workers`` > 1
    side by side in threads (the costliest budgets first, so that the last ones to start
    are short), each on one intra-op thread; with ``merger``, every budget at once, each
    joined to its lane (on the process's intra-op threads where there is one lane). Every
    budget counts its own evaluations."""

    def one(i: int) -> BudgetChoice:
        counter = _Counter(prob.denoiser.denoiser, opts.memo_mb)
        tb = time.perf_counter()
        joined = contextlib.nullcontext() if merger is None else merger.joined(i)
        with torch.no_grad(), joined:  # grad mode is per thread
            c = _tune_budget(dataclasses.replace(prob, denoiser=counter), budgets[i], w, opts)
        return dataclasses.replace(c, evaluations=counter.rows, seconds=time.perf_counter() - tb)

    if workers <= 1:
        found = []
        for i in range(len(budgets)):
            found.append(one(i))
            bar.update()
        return found
    before = torch.get_num_threads()
    if merger is None or len(set(merger.lanes)) > 1:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="tune") as pool:
            order = sorted(range(len(budgets)), key=lambda i: -budgets[i])
            futures = {pool.submit(one, i): i for i in order}
            done: dict[int, BudgetChoice] = {}
            for f in as_completed(futures):
                done[futures[f]] = f.result()
                bar.update()
    finally:
        torch.set_num_threads(before)
    return [done[i] for i in range(len(budgets))]


def _arguments(
    noise: Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    guidance_scale: float | Sequence[float],
    nfe: Sequence[int],
    options: Mapping[str, Any],
) -> tuple[TuneOptions, list[int], list[float]]:
    """:func:`tune`'s arguments, checked: the options, budgets and guidance scales."""
    names = {f.name for f in dataclasses.fields(TuneOptions)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"tune() got unknown option(s) {unknown}; accepted: {sorted(names)}")
    opts = TuneOptions(**options)
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise TypeError("noise must be a floating-point tensor with a batch dimension")
    if noise.shape[0] < 4:
        raise ValueError(
            f"noise: the pilot needs at least 4 noises (half are held out), got {noise.shape[0]}"
        )
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r} is not supported; accepted: {PREDICTIONS}")
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    budgets = [check_int(f"nfe[{i}]", n, minimum=1) for i, n in enumerate(nfe)]
    if not budgets:
        raise ValueError("nfe: give at least one budget")
    scales = (
        [float(guidance_scale)]
        if isinstance(guidance_scale, (int, float))
        else [float(w) for w in guidance_scale]
    )
    for w in scales:
        check_finite_float("guidance_scale", w)
    try:
        from scipy.optimize import minimize  # noqa: F401
    except ImportError as e:  # pragma: no cover - scipy is in the demo and test extras
        raise ImportError("tune needs scipy: pip install scipy") from e
    return opts, budgets, scales


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
    from .analytic import exact_sample

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


def _lanes(budgets: Sequence[int], lanes: int) -> list[int]:
    """Each budget's lane: the costliest first, each to the lane of least NFE so far."""
    load = [0] * lanes
    out = [0] * len(budgets)
    for i in sorted(range(len(budgets)), key=lambda i: -budgets[i]):
        out[i] = min(range(lanes), key=lambda k: load[k])
        load[out[i]] += budgets[i]
    return out


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
        from .analytic import solve_from_pure_noise

        return solve_from_pure_noise(den, x, a, b, schedule, rtol=rtol, atol=rtol * 1e-2)
    return reference_solve(den, x, a, b, schedule, rtol=rtol, atol=rtol * 1e-2)


def _rescore(prob: _Problem, c: BudgetChoice) -> BudgetChoice:
    """``c``'s errors against ``prob``'s (tighter) reference."""
    x = prob.run(c.recipe(), c.nfe)
    return dataclasses.replace(
        c,
        calibration_error=_rms_rows(prob, x, prob.cal),
        heldout_error=float(prob.errors(x, prob.held).pow(2).mean().sqrt()),
    )


def _candidate(
    name: str,
    options: Mapping[str, Any],
    kind: str,
    rho: float | None,
    nfe: int,
    sigma_max: float | None = None,
) -> Recipe | None:
    """A stage (a) candidate; ``options`` may hold the recipe's ``lower_order_final``
    besides the solver's options (None where the default rule already lowers the last
    orders at ``nfe``: the candidate without it is the same run)."""
    opts = dict(options)
    lof = opts.pop("lower_order_final", None)
    if lof and lower_order_final_default(nfe):
        return None
    return Recipe(
        name,
        opts,
        grid=kind,  # type: ignore[arg-type]
        rho=rho,
        lower_order_final=lof,
        sigma_max=sigma_max,
    )


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


def _tune_budget(prob: _Problem, nfe: int, w: float, opts: TuneOptions) -> BudgetChoice:
    """Stages (a) and (b) for one budget (module docstring)."""
    default = resolve("auto", PolicyRequest(nfe, w, prob.schedule))
    best = default_choice = _choice(prob, default, nfe, "default")
    taken = [best]  # each stage's accepted choice, for the guard

    # (a) selection: screen every candidate on a few calibration rows, then the finalists
    scored = _screened(prob, nfe, opts)
    finalists = _ranked(
        prob, [_choice(prob, r, nfe, "selection") for _, r in scored[: opts.finalists]], opts
    )
    finalists = _tail_ranked(prob, finalists, opts)
    for finalist in finalists:
        # the best finalist that the held-out half takes (or, as a study, the guard's rows)
        if _stage_a_takes(prob, finalist, best, opts):
            best = finalist
            taken.append(best)
            break
    selected = best  # what the tail check compares the fitted stages' choice with

    # (b) time steps: the dynamic programming for the chosen solver and the next best
    # finalists (and the default), each from its own grid's knots and its DP knots; the
    # best of those starts on the calibration rows is refined against its actual error
    bases: list[_Choice] = []
    for c in [best, *finalists, default_choice]:
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
    if starts:
        _, base, lams = min(starts, key=lambda e: e[0])
        fitted = _refine(
            prob, base, nfe, lams, opts.refine_runs, prob.cal[: opts.refine_rows], ratio
        )
        if fitted is not None and _accept(fitted, best, prob, opts):
            best = fitted
            taken.append(best)
        else:
            # the refined knots did not carry over to the held-out half: the DP's own may
            for _, fit in sorted(fits, key=lambda e: e[0])[:2]:
                dp_choice = _choice(prob, fit, nfe, "steps")
                if _accept(dp_choice, best, prob, opts):
                    best = dp_choice
                    taken.append(best)
                    break

    # (c) the network's time at each knot, for the recipe chosen so far
    if opts.shift_runs > 0:
        rows = prob.cal[: opts.shift_rows]
        shifted = _shift(prob, best.recipe, nfe, opts.shift_runs, rows, opts.shift_bound)
        if shifted is not None and _accept(shifted, best, prob, opts):
            best = shifted
            taken.append(best)
    # (d) the per-sample step limit, where it helps the held-out half
    if opts.step_limit is not None and best.recipe.step_limit is None:
        limited = dataclasses.replace(best.recipe, step_limit=opts.step_limit)
        tried = _choice(prob, limited, nfe, best.stage)
        if _accept(tried, best, prob, opts, changed_only=True):
            best = tried
            taken.append(best)
    # (e) the step into sigma = 0 extrapolated from the last two data predictions
    if opts.extrapolate_final and best.recipe.final_step == "denoise":
        extrapolated = dataclasses.replace(best.recipe, final_step="extrapolate")
        tried = _choice(prob, extrapolated, nfe, best.stage)
        if _accept(tried, best, prob, opts):
            best = tried
            taken.append(best)
    # (h) the order of each step: before (f) and (g), which fit on the trajectory it makes
    if opts.order_search and nfe <= opts.order_max_nfe:
        reordered = _reorder(prob, best.recipe, nfe, prob.cal[: opts.order_rows])
        if reordered is not None and _accept(reordered, best, prob, opts):
            best = reordered
            taken.append(best)
    # (i) which steps' results UniPC leaves uncorrected: before (f) and (g), as (h)
    if opts.corrector_search and nfe <= opts.corrector_max_nfe:
        uncorrected = _uncorrect(prob, best.recipe, nfe, prob.cal[: opts.corrector_rows])
        if uncorrected is not None and _accept(uncorrected, best, prob, opts):
            best = uncorrected
            taken.append(best)
    # (f) the data predictions extrapolated from the previous knot's, by a ratio per step
    if opts.compensation_runs > 0 and nfe <= opts.compensation_max_nfe:
        compensated = _compensate(prob, best.recipe, nfe, opts)
        if compensated is not None and _accept(compensated, best, prob, opts):
            best = compensated
            taken.append(best)
    # (g) the data predictions corrected in the trajectory's principal directions
    if opts.correction_components > 0 and nfe <= opts.correction_max_nfe:
        corrected = _correct(prob, best.recipe, nfe, opts)
        if corrected is not None and _accept(corrected, best, prob, opts):
            best = corrected
            taken.append(best)
    refused: tuple[str, ...] = ()
    if prob.guard is not None:
        best, refused = _guarded(prob.guard, prob, taken, nfe, opts)
        if opts.guard_fallback and refused and best is default_choice:
            best = _fallback(prob, prob.guard, finalists, default_choice, opts) or best
        k = next(i for i, c in enumerate(taken) if c is selected)
        past_a = any(c is best for c in taken[k + 1 :])  # a stage after (a), not refused
        if opts.tail_rows > 0 and past_a and best.recipe != selected.recipe:
            checked = _tail_checked(prob, prob.guard, best, selected, opts)
            if checked is not best and opts.tail_walk_back:
                checked = _walked_back(prob, prob.guard, taken[k + 1 :], best, selected, opts)
            if checked is not best:
                j = next(i for i, c in enumerate(taken) if c is checked)  # (a)'s or later
                later = (c.stage for c in reversed(taken[j + 1 :]))
                refused, best = tuple(dict.fromkeys((*refused, *later))), checked
        prob.guard.forget(nfe)
    r = best.recipe
    return BudgetChoice(
        nfe=nfe,
        guidance_scale=w,
        solver=r.solver,
        options={k: getattr(v, "value", v) for k, v in r.options.items()},  # JSON values
        grid=r.grid,
        rho=r.rho,
        sigma_max=r.sigma_max,
        sigma_end=r.sigma_end,
        final_step=r.final_step,
        times=r.timesteps,
        stage=best.stage,
        calibration_error=best.cal,
        heldout_error=float(best.held.pow(2).mean().sqrt()),
        default_heldout_error=float(default_choice.held.pow(2).mean().sqrt()),
        model_shifts=r.model_shifts,
        lower_order_final=r.lower_order_final,
        guard_refused=refused,
        step_limit=r.step_limit,
        compensation=r.compensation,
        correction=r.correction,
        orders=r.orders,
    )


def _held_rows(c: _Choice) -> tuple[float, int]:
    """The sum of ``c``'s squared held-out errors, and their number."""
    return float(c.held.pow(2).sum()), len(c.held)


def _calibration_rows(prob: _Problem) -> Callable[[_Choice], tuple[float, int]]:
    """The sum of a choice's squared calibration errors, and their number."""
    return lambda c: (len(prob.cal) * c.cal**2, len(prob.cal))


def _tail_mse(
    prob: _Problem,
    guard: _Guard,
    choices: Sequence[_Choice],
    opts: TuneOptions,
    pilot: Callable[[_Choice], tuple[float, int]] = _held_rows,
    accept: bool = False,
) -> list[float] | None:
    """Each choice's mean squared error estimated over pilot rows (``pilot``: the sum of
    its squared errors there and their number; default the held-out half) and the guard's:
    all run from the guard's noises (``accept``: the runs stage (a) reads, :meth:`_Guard.
    samples`); the :attr:`TuneOptions.tail_rows` guard rows on which
    two of them end farthest apart, beyond ``tail_factor`` times the largest sum of those
    two's errors on a held-out row, get an exact reference; the other guard rows count at
    each choice's pilot mean. None where no guard row is that far apart (nothing to add to
    the pilot rows) or a choice cannot run."""
    runs = guard.runs_of(prob, choices, accept)
    if runs is None:
        return None
    apart = torch.zeros(len(guard.rows), dtype=torch.float64)
    usual = 0.0
    for i, j in itertools.combinations(range(len(choices)), 2):
        apart = torch.maximum(apart, _per_sample(runs[i], runs[j]))
        usual = max(usual, float((choices[i].held + choices[j].held).max()))
    order = apart.argsort(descending=True).tolist()
    far = [i for i in order if float(apart[i]) > opts.tail_factor * usual]
    if not far:
        return None
    return _estimated_mse(prob, guard, choices, runs, far[: opts.tail_rows], pilot)


def _estimated_mse(
    prob: _Problem,
    guard: _Guard,
    choices: Sequence[_Choice],
    runs: Sequence[Tensor],
    rows: list[int],
    pilot: Callable[[_Choice], tuple[float, int]],
) -> list[float]:
    """Each choice's mean squared error over the pilot rows ``pilot`` gives and all the
    guard rows: the guard rows ``rows`` against their exact reference, the others at the
    choice's pilot mean (``runs``: the choices' guard samples)."""
    ref = guard.reference(prob, rows) if rows else None
    others = len(guard.rows) - len(rows)

    def mse(c: _Choice, x: Tensor) -> float:
        total, n = pilot(c)
        tail = 0.0 if ref is None else float(_per_sample(x[rows], ref.to(x.device)).pow(2).sum())
        return (total + others * total / n + tail) / (n + len(guard.rows))

    return [mse(c, x) for c, x in zip(choices, runs, strict=True)]


def grid_families(
    schedule: NoiseSchedule, opts: TuneOptions
) -> list[tuple[str, float | None, float | None]]:
    """Stage (a)'s grid families on ``schedule``, ``(kind, rho, sigma_max)``: ``opts.grids``,
    and on a schedule that starts at pure noise their kinds spaced in noise level entered
    at ``opts.flow_sigma_max`` too (:attr:`TuneOptions.flow_sigma_max`)."""
    families: list[tuple[str, float | None, float | None]] = [
        (kind, rho, None) for kind, rho in opts.grids
    ]
    if opts.flow_sigma_max is not None and schedule.starts_at_pure_noise:
        families += [
            (k, rho, opts.flow_sigma_max) for k, rho in opts.grids if k in LEVEL_SPACED_KINDS
        ]
    return families


def _screened(prob: _Problem, nfe: int, opts: TuneOptions) -> list[tuple[float, Recipe]]:
    """Stage (a)'s screen: every candidate (``opts.solvers`` x ``opts.grids``, and on a
    schedule that starts at pure noise the grids spaced in noise level entered at
    ``opts.flow_sigma_max`` too) that spends exactly ``nfe``, with its RMS error on the
    first ``opts.screen_rows`` calibration rows, best first."""
    screen = prob.cal[: opts.screen_rows]
    scored: list[tuple[float, Recipe]] = []
    for name, options in opts.solvers:
        if name == "dpmv3" and opts.v3_max_nfe is not None and nfe > opts.v3_max_nfe:
            continue
        for kind, rho, sigma_max in grid_families(prob.schedule, opts):
            r = _candidate(name, options, kind, rho, nfe, sigma_max)
            if r is None:
                continue
            x = prob.run(r, nfe, screen)
            if x is not None:
                scored.append((_rms(x, prob.reference[screen]), r))
    scored.sort(key=lambda e: e[0])
    return scored


def _tail_checked(
    prob: _Problem, guard: _Guard, chosen: _Choice, robust: _Choice, opts: TuneOptions
) -> _Choice:
    """``chosen`` or ``robust``, whichever has the smaller mean squared error estimated over
    the held-out rows and the guard's (:func:`_tail_mse`)."""
    mse = _tail_mse(prob, guard, [chosen, robust], opts)
    return robust if mse is not None and mse[1] < mse[0] else chosen


def _stage_a_takes(prob: _Problem, new: _Choice, old: _Choice, opts: TuneOptions) -> bool:
    """Whether stage (a) takes finalist ``new`` over ``old``: by the held-out half
    (:func:`_accept`), or with :attr:`TuneOptions.tail_accept`, where the guard's noises
    show a row on which the two end far apart, by the mean squared error :func:`_tail_mse`
    estimates over the held-out rows and the guard's, no held-out sample newly diverging."""
    if opts.tail_accept and prob.guard is not None and opts.tail_rows > 0:
        mse = _tail_mse(prob, prob.guard, [new, old], opts, accept=True)
        if mse is not None:
            return no_new_divergence(new.held, old.held, prob.spread) and mse[0] < mse[1]
    return _accept(new, old, prob, opts)


def _walked_back(
    prob: _Problem,
    guard: _Guard,
    later: Sequence[_Choice],
    refused: _Choice,
    robust: _Choice,
    opts: TuneOptions,
) -> _Choice:
    """The latest of the choices ``later`` (accepted after stage (a), up to ``refused``, the
    choice the tail check refused) that blows up no more guard samples than ``refused`` and
    that the tail check keeps against stage (a)'s ``robust``; ``robust`` if none
    (:attr:`TuneOptions.tail_walk_back`)."""
    limit = guard.blowups(prob, refused.recipe, refused.nfe)
    end = next(i for i, c in enumerate(later) if c is refused)
    for c in reversed(later[:end]):
        if c.recipe == robust.recipe or guard.blowups(prob, c.recipe, c.nfe) > limit:
            continue
        if _tail_checked(prob, guard, c, robust, opts) is c:
            return c
    return robust


def _tail_ranked(prob: _Problem, finalists: list[_Choice], opts: TuneOptions) -> list[_Choice]:
    """Stage (a)'s finalists (ranked) re-ranked by the error :func:`_tail_mse` estimates
    over the calibration rows and the guard's (the held-out half stays the independent
    check), where the guard's noises show a far sample that the pilot did not (unchanged
    where none, or without a guard: :attr:`TuneOptions.tail_ranking`)."""
    factor = opts.tail_ranking
    live = [c for c in finalists if bool(torch.isfinite(c.held).all())]
    if prob.guard is None or factor is None or opts.tail_rows == 0 or len(live) < 2:
        return finalists
    if opts.tail_trigger == "disagree" and _held_first(live) is live[0]:
        return finalists
    mse = _tail_mse(prob, prob.guard, live, opts, _calibration_rows(prob))
    if mse is None or (factor > 1.0 and mse[0] <= factor**2 * min(mse)):
        return finalists
    ranked = [c for _, _, c in sorted(zip(mse, range(len(live)), live, strict=True))]
    return ranked + [c for c in finalists if all(c is not r for r in ranked)]


def _held_first(choices: Sequence[_Choice]) -> _Choice:
    """The choice with the smallest held-out RMS error (the first of equals)."""
    return min(choices, key=lambda c: float(c.held.pow(2).mean()))


def _ranked(prob: _Problem, finalists: list[_Choice], opts: TuneOptions) -> list[_Choice]:
    """Stage (a)'s finalists, best first, on the rows ``opts.rank_rows`` names."""
    if opts.rank_rows == "calibration":
        return sorted(finalists, key=lambda c: c.cal)
    if opts.rank_rows == "worse":
        return sorted(finalists, key=lambda c: c.worse_half())
    return sorted(finalists, key=lambda c: c.pooled(len(prob.cal)))


def _guarded(
    guard: _Guard, prob: _Problem, taken: Sequence[_Choice], nfe: int, opts: TuneOptions
) -> tuple[_Choice, tuple[str, ...]]:
    """The latest of the stages' choices ``taken`` with the fewest guard blow-ups (with
    :attr:`TuneOptions.guard_rule` ``"mse"``, where that is not the last choice: the one
    of those run with the smallest :func:`_blowup_mse`), and the stages refused for it
    (latest first). The last choice runs first; earlier ones only while none is found
    without a blow-up."""
    counts = [guard.blowups(prob, taken[-1].recipe, nfe)]
    for c in reversed(taken[:-1]):
        if counts[-1] == 0:
            break
        counts.append(guard.blowups(prob, c.recipe, nfe))
    k = counts.index(min(counts))  # counts[k] is taken[-1 - k]: the first minimum is latest
    if k > 0 and opts.guard_rule == "mse":
        mse = _blowup_mse(prob, guard, [taken[-1 - i] for i in range(len(counts))])
        if mse is not None:
            k = mse.index(min(mse))
    return taken[-1 - k], tuple(c.stage for c in reversed(taken[len(taken) - k :]))


def _fallback(
    prob: _Problem,
    guard: _Guard,
    finalists: Sequence[_Choice],
    default: _Choice,
    opts: TuneOptions,
) -> _Choice | None:
    """Stage (a)'s first finalist that the held-out half takes over the ``default`` recipe
    and that sends no more guard samples beyond the bound than it (None if none:
    :attr:`TuneOptions.guard_fallback`)."""
    limit = guard.blowups(prob, default.recipe, default.nfe)
    for f in finalists:
        if f.recipe == default.recipe or guard.blowups(prob, f.recipe, f.nfe) > limit:
            continue
        if _accept(f, default, prob, opts):
            return f
    return None


def _blowup_mse(prob: _Problem, guard: _Guard, choices: Sequence[_Choice]) -> list[float] | None:
    """Each choice's mean squared error estimated over the held-out rows and the guard's
    (:func:`_estimated_mse`), the guard rows beyond the bound under any of them (at most
    :data:`GUARD_REFERENCE_ROWS`, the farthest first) against their exact reference; None
    if a choice cannot run."""
    runs = guard.runs_of(prob, choices)
    if runs is None:
        return None
    far = torch.stack([guard.beyond(x) for x in runs]).any(0)
    farthest = torch.stack([_norms(x) for x in runs]).nan_to_num(math.inf).amax(0)
    order = farthest.argsort(descending=True).tolist()
    rows = [i for i in order if bool(far[i])][:GUARD_REFERENCE_ROWS]
    return _estimated_mse(prob, guard, choices, runs, rows, _held_rows)


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


def _accept(
    new: _Choice,
    old: _Choice,
    prob: _Problem,
    opts: TuneOptions,
    *,
    changed_only: bool = False,
) -> bool:
    """Kept only if it helps the held-out half (:func:`paired_better`, and by
    ``opts.accept_z`` standard errors: :func:`clear_gain`), no held-out sample newly
    diverges (:func:`no_new_divergence`) and, with ``opts.worst_factor``, the worst held-out
    sample does not end more than that factor farther than it did.
    ``changed_only``: the paired comparison runs on the held-out samples ``new`` changes
    (stage (d), which leaves most samples bit for bit: on all of them the median of the
    log-ratios is 0 and nothing could pass); none changed is no help."""
    worst = opts.worst_factor
    if worst is not None and float(new.held.max()) > worst * float(old.held.max()):
        return False
    rows = new.held != old.held if changed_only else torch.ones_like(new.held, dtype=torch.bool)
    if not bool(rows.any()):
        return False
    if not (
        no_new_divergence(new.held, old.held, prob.spread)
        and paired_better(new.held[rows], old.held[rows])
        and clear_gain(new.held[rows], old.held[rows], opts.accept_z)
    ):
        return False
    if prob.probes is None:
        return True
    # no more of the probes' arcs across a mode boundary, give or take the finest probe
    slack = prob.probes.resolution / prob.probes.pairs
    return new.probe_band(prob) <= old.probe_band(prob) + slack


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


_SHIFT_STEP = 0.05  # a few hundredths of log-SNR
_COMPENSATION_STEP = 0.1


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
    corrected = dataclasses.replace(base, correction=tuple(fit.fitted))
    return _choice(prob, corrected, nfe, "correction")


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
