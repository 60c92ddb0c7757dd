""":func:`tune`: the pilot built once per guidance scale, every budget searched stage by
stage (:func:`_tune_budget`: (a) selection, (b) steps, (c) shifts, (d) step limit, (e)
final step, (h)/(i) studies, (f) compensation, (g) correction; the guard, tail check and
norm cap), budgets side by side on lanes of merged network calls."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._validate import check_finite_float, check_int
from ..denoiser import Network
from ..merge import CallMerger
from ..parameterization import PREDICTIONS, Prediction
from ..progress import Progress
from ..recipe import PolicyRequest, Recipe, resolve
from ..sampling import SampleOptions
from ..schedules import NoiseSchedule
from .acceptance import _accept, _kept, _stage_a_takes
from .options import (
    CAPPED_GUARD_RULES,
    DEFAULT_BUDGETS,
    STEP_LIMIT_FLOOR,
    V3_SEED,
    TuneOptions,
    grid_families,
    v3_candidates,
)
from .pilot import (
    _Choice,
    _choice,
    _Counter,
    _end_times,
    _fine_knots,
    _pilot,
    _Problem,
    _rms_rows,
    _RowDenoiser,
    _Rows,
    _seeded_noise,
)
from .profile import BudgetChoice, Profile, schedule_fingerprint
from .selection import _finalists
from .stages import LATE_STAGES
from .steps import _fitted_steps

if TYPE_CHECKING:  # the statistics' module loads lazily, where a tune uses them
    from ..ems import EMS


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
            if opts.guard_rule in CAPPED_GUARD_RULES and prob.guard is not None:
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
            found = [_calibrated(prob, c, cap, opts) for c in found]
            choices += [c.with_recipe(x0_norm_cap=cap) for c in found]
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


def _calibrated(
    prob: _Problem,
    choice: BudgetChoice,
    cap: tuple[tuple[float, float], ...] | None,
    opts: TuneOptions,
) -> BudgetChoice:
    """``choice`` with the step limit (:attr:`TuneOptions.step_limit_margin`) and the
    per-step correction envelope (:attr:`TuneOptions.envelope_margin`) calibrated on the
    pilot, where asked for and where the recipe corrects its steps. One probe of the pilot
    serves both: a calibrated limit binds on no pilot row, so the pilot's steps under it
    are the probe's, bit for bit."""
    if opts.step_limit_margin is None and opts.envelope_margin is None:
        return choice
    recipe = choice.recipe
    probe = prob.step_ratios(recipe, choice.nfe, cap)
    if probe is None:
        return choice
    if opts.step_limit_margin is not None and recipe.step_limit is None and probe.largest > 0:
        kappa = max(STEP_LIMIT_FLOOR, opts.step_limit_margin * probe.largest)
        choice = dataclasses.replace(
            choice.with_recipe(step_limit=kappa), pilot_correction=probe.largest
        )
    margin = opts.envelope_margin
    plan = None if margin is None else prob.plan(recipe, choice.nfe)
    if margin is not None and plan is not None:
        steps = len(plan.steps)
        # the probe saw only the steps the loop hands it: the step into sigma = 0 is not one
        seen_c = (probe.corrections + [0.0] * steps)[:steps]
        seen_d = (probe.displacements + [0.0] * steps)[:steps]
        # a step whose corrections are rounding (the first-order step of a multistep
        # start) gets no bound: 0
        envelope = tuple(
            margin * c if c > _NO_CORRECTION * d else 0.0
            for c, d in zip(seen_c, seen_d, strict=True)
        )
        if any(envelope):  # else first order throughout: nothing to bound
            choice = choice.with_recipe(
                step_envelope=envelope, envelope_persistence=opts.envelope_persistence
            )
    return choice


#: Below this share of its first-order displacement, a step's largest pilot correction is
#: rounding, not a correction (:func:`_calibrated`).
_NO_CORRECTION = 1e-9


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
    from ..ems import estimate_ems

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
    except ImportError as e:  # scipy is in the demo and test extras
        raise ImportError("tune needs scipy: pip install scipy") from e
    return opts, budgets, scales


def _lanes(budgets: Sequence[int], lanes: int) -> list[int]:
    """Each budget's lane: the costliest first, each to the lane of least NFE so far."""
    load = [0] * lanes
    out = [0] * len(budgets)
    for i in sorted(range(len(budgets)), key=lambda i: -budgets[i]):
        out[i] = min(range(lanes), key=lambda k: load[k])
        load[out[i]] += budgets[i]
    return out


def _rescore(prob: _Problem, c: BudgetChoice) -> BudgetChoice:
    """``c``'s errors against ``prob``'s (tighter) reference."""
    x = prob.run(c.recipe, c.nfe)
    return dataclasses.replace(
        c,
        calibration_error=_rms_rows(prob, x, prob.cal),
        heldout_error=float(prob.errors(x, prob.held).pow(2).mean().sqrt()),
    )


def _tune_budget(prob: _Problem, nfe: int, w: float, opts: TuneOptions) -> BudgetChoice:
    """One budget's search: the stages in the package docstring's order, each kept only
    where the held-out half takes it over the choice so far, then the guard and tail check."""
    default = _choice(prob, resolve("auto", PolicyRequest(nfe, w, prob.schedule)), nfe, "default")
    taken = [default]  # each stage's accepted choice, for the guard
    # (a) the best finalist that the held-out half takes (or, as a study, the guard's rows)
    finalists = _finalists(prob, nfe, opts)
    selected = next((f for f in finalists if _stage_a_takes(prob, f, default, opts)), default)
    if selected is not default:
        taken.append(selected)
    # (b) the time steps
    stepped = _fitted_steps(prob, nfe, selected, [selected, *finalists, default], opts)
    if stepped is not None:
        taken.append(stepped)
    # (c)-(i), each on the choice so far
    for offer, changed_only in LATE_STAGES:
        tried = offer(prob, taken[-1], nfe, opts)
        if tried is not None and _accept(tried, taken[-1], prob, opts, changed_only=changed_only):
            taken.append(tried)
    best, refused = _kept(prob, taken, selected, finalists, nfe, opts)
    return _budget_choice(best, default, refused, w)


def _budget_choice(
    best: _Choice, default: _Choice, refused: tuple[str, ...], w: float
) -> BudgetChoice:
    """The profile's record of ``best`` (with the default's held-out error beside it)."""
    r = best.recipe
    return BudgetChoice(
        nfe=best.nfe,
        guidance_scale=w,
        # JSON values for the options; a tuned recipe's start, end and final are the grid's
        recipe=dataclasses.replace(
            r,
            options={k: getattr(v, "value", v) for k, v in r.options.items()},
            t_start=None,
            t_end=None,
            final="zero",
        ),
        stage=best.stage,
        calibration_error=best.cal,
        heldout_error=float(best.held.pow(2).mean().sqrt()),
        default_heldout_error=float(default.held.pow(2).mean().sqrt()),
        guard_refused=refused,
    )
