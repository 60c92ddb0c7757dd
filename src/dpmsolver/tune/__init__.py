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
   *(g2) The same coordinates refitted against the final sample* (a study, off by default:
   ``TuneOptions.correction_refine``; S4S's objective, Frankel et al. 2025): damped
   Gauss-Newton on every calibration row's final sample, from (g)'s fit whether or not
   (g) was kept, offered as one more candidate. Passed on the selection problems, refused
   blind by one more cell over 2x the peer (``benchmarks/stage_g_refit.md``).
10. Otherwise the default recipe stays.
11. *Blow-up guard.* Each budget's final choice also runs from 512 noises of tune's own,
   with no reference; if more of its samples end beyond twice the largest pilot
   reference's norm than an earlier stage's choice sent there, the latest stage with the
   fewest is taken (``TuneOptions.guard_rows``). The held-out half sees a blow-up of 1-2
   samples in 512 (third-order UniPC at guidance 15, for one) too rarely to refuse it.
   Since stop 63 the guard refuses that choice only where its excess stands in a sign test,
   or where an exact reference for the far samples finds it costs more than it gains
   (``TuneOptions.guard_rule="paired_mse"``; ``"count"`` was the rule before).
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

The package, one module per idea: :mod:`.profile` (what is chosen, saved and loaded),
:mod:`.options` (what is searched), :mod:`.comparison` (how two choices compare on the same
rows), :mod:`.pilot` (the reference, rows, guard and counted network), :mod:`.selection`
(stage (a)), :mod:`.steps` (stage (b)), :mod:`.stages` (stages (c)-(i), (g2)),
:mod:`.acceptance` (what is kept: the held-out verdict, guard and tail check) and
:mod:`.search` (:func:`tune` itself, the stages in order).
"""

from .comparison import clear_gain, no_new_divergence, paired_better
from .options import (
    DEFAULT_BUDGETS,
    V3_CANDIDATES,
    V3_NOISES,
    V3_SEED,
    TuneOptions,
    grid_families,
    v3_candidates,
)
from .profile import (
    PROFILE_FORMAT,
    READABLE_FORMATS,
    BudgetChoice,
    Profile,
    ProfileMismatchError,
    schedule_fingerprint,
)
from .search import tune

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
