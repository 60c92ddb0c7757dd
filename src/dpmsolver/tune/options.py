"""What :func:`dpmsolver.tune` searches and how: :class:`TuneOptions`, the stage (a)
candidates (:data:`TUNE_SOLVERS` x :data:`TUNE_GRIDS`, :func:`grid_families`), the default
budgets and the fixed seeds of tune's own noises."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._validate import check_choice, check_finite_float, check_int
from ..correction import MAX_COMPONENTS
from ..sampling import SampleOptions
from ..schedules import NoiseSchedule
from ..steplimit import check_step_limit
from ..timegrid import LEVEL_SPACED_KINDS

if TYPE_CHECKING:  # the statistics' module loads lazily, where a tune uses them
    from ..ems import EMS


#: Log-SNR bins of the pilot's envelope of data-prediction norms (:attr:`TuneOptions.norm_cap`).
CAP_BINS = 32


#: The guard noises' seed (:attr:`TuneOptions.guard_rows`): fixed, so that a profile does
#: not depend on the global generator.
GUARD_SEED = 0x6A4D

#: The smallest calibrated step limit (:attr:`TuneOptions.step_limit_margin`): stage (d)'s
#: factor, below which a limit cuts corrections of the size ordinary samples make.
STEP_LIMIT_FLOOR = 2.0


#: The seed of the noises DPM-Solver-v3's statistics are estimated on with
#: ``TuneOptions.v3_noise="own"`` (neither the pilot's nor the guard's).
V3_SEED = 0x3E35


#: Where DPM-Solver-v3's statistics come from (:attr:`TuneOptions.v3_noise`).
V3_NOISES = ("pilot", "own")


#: Which pilot rows rank stage (a)'s finalists (:attr:`TuneOptions.rank_rows`).
RANK_ROWS: tuple[str, ...] = ("calibration", "pilot", "worse")


#: How the blow-up guard picks among the stages' choices (:attr:`TuneOptions.guard_rule`).
GUARD_RULES: tuple[str, ...] = ("count", "capped", "mse", "paired", "paired_mse")
#: The guard rules whose runs sample under the profile's norm cap.
CAPPED_GUARD_RULES: tuple[str, ...] = ("capped", "mse")
#: The guard rules that refuse a later choice only where its excess stands
#: (:func:`~dpmsolver.tune.acceptance._referee_keeps`).
PAIRED_GUARD_RULES: tuple[str, ...] = ("paired", "paired_mse")


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
        correction_refine: Gauss-Newton iterations (Levenberg-Marquardt damped) that refit
            stage (g)'s coefficients all together against the final samples' error on
            every calibration row, after the step-by-step fit (S4S's objective, Frankel
            et al. 2025), offered as stage (g2) after (g): each costs one run per
            coefficient. Default 0, off: at 2, stop 56's rule passed it on the selection
            problems but the blind third round refused it by one more cell over 2x the
            best peer (``benchmarks/stage_g_refit.md``).
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
            more guard samples beyond the bound than an earlier one: ``"count"`` takes the
            latest with the fewest (the default until stop 63); ``"capped"`` does so with
            the guard's noises run under the norm cap the profile samples with
            (:attr:`norm_cap`; the tail ranking and the tail check see those capped runs
            too); ``"mse"`` runs them so too, gives the guard rows beyond the bound under
            any of the compared choices an exact reference (at most
            :data:`GUARD_REFERENCE_ROWS`, the farthest first), and takes the choice with the
            smallest mean squared error estimated over the held-out rows and the guard's
            (the latest of equals; the other guard rows count at each choice's held-out
            mean), as the tail check does. Why: the count refuses a recipe for one far
            sample in 512 however much better it is on the other 511, and the norm cap
            already bounds that sample when sampling: at guidance 15 and 15 NFE on ill64-edm
            the fitted recipe's held-out error was 0.022 against the default DDIM's 0.73,
            with 2 guard samples beyond the bound (4.1-4.8 from the origin under the cap, 70
            without; the bound 2.8), and the count took DDIM, 4.6x the best peer on the test
            set. A study, not taken (stop 50, rule written before the runs,
            benchmarks/guard_mse.md): on the selection problems at guidance 7.5 and 15, 5-15
            NFE (336 cells, 512 new noises) ``"mse"`` met the best peer in 292 cells and
            ``"capped"`` in 291, against 293; each sent two cells to DDIM (one 0.29x ->
            2.35x), where a capped guard run left a sample beyond the bound. ``"paired"``
            refuses a later choice only where its excess over the choice with the fewest is
            more than chance: with ``a`` the guard samples beyond the bound under it but not
            under that one and ``b`` the reverse, where ``a - b >=`` :attr:`guard_z`
            ``* sqrt(a + b)`` (a sign test on the discordant samples); the latest choice not
            refused is kept. It keeps what the count keeps wherever the count refuses
            nothing. Why: at stop 61 (benchmarks/guard_refusals.md) five of six blind cells
            left on the default had a finalist the held-out half took, 1.45-5.8x better on
            the pilot, refused for one or a few more far samples in 512 (lowrank64-edm,
            guidance 7.5, 5 NFE: 2.7x the best peer with the default). A study, not taken
            (stop 62, rule written before the runs, benchmarks/policy_round8.md): on the
            seventh round's problems at guidance 3-15 and 5-8 NFE (72 selection cells, 512
            new noises) it met the best peer in 68 cells against the count's 67 (the rule
            asked for 2 more). It rescued both diagnosed lowrank64-edm cells (2.72x ->
            0.82x, 1.35x -> 0.52x) and made one new miss: on ill256-flow3 at guidance 3 and
            8 NFE the finalist the count refused does leave the data on new noises (0.91x ->
            2.42x). Blind on the eighth round (the same 72 cells) it changed one, for the
            better (1.06x -> 0.94x). ``"paired_mse"`` also keeps such a choice only where
            its mean squared error, estimated over the held-out rows and the guard's with an
            exact reference for the rows beyond the bound under either (at most
            :data:`GUARD_REFERENCE_ROWS`, the farthest first; uncapped runs, as the
            count's), is no larger than that of the choice with the fewest: the excess is
            chance and does not cost. The default since stop 63
            (benchmarks/policy_round9.md, rule written before the ninth round): over every
            cell of the seventh and eighth rounds (512 selection cells, 512 new noises each)
            it met the best peer in 461 against the count's 459 (and 464 against 462 on the
            test sets), and made no cell worse; the two it changed were lowrank64-edm at
            guidance 3 and 5 NFE (1.35x -> 0.52x) and ill128-edm at guidance 15 and 5 NFE
            (1.06x -> 0.94x). On the 72 seventh-round cells alone it had not met stop 62's
            rule (2 more cells asked, 1 met).
        guard_z: the standard errors by which :attr:`guard_rule` ``"paired"`` and
            ``"paired_mse"`` need the excess of far samples to stand before they refuse it
            (default 2).
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
        step_limit_margin: a choice that samples without a step limit (stage (d) did not
            take one) gets one calibrated on the pilot: this factor times the largest ratio
            of a step's correction to its first-order step that any of the pilot's rows
            reaches under the chosen recipe, run as the profile samples (norm cap
            included), and never below :data:`STEP_LIMIT_FLOOR`
            (:attr:`BudgetChoice.pilot_correction` holds the ratio). No pilot row reaches
            the limit, so it changes neither the choice nor its pilot errors; it binds
            only on a sample whose correction outgrows the pilot's by the margin, as a
            sample thrown off the data was meant to (default None: no calibrated limit; a
            study, ``benchmarks/step_limit_calibrated.md``). It was meant to keep stage
            (d)'s fixed limit of 2 off legitimate corrections (4.4 at guidance 15 on a flow
            problem) while still catching runaways. On the fourth fresh round at 12-25
            NFE it changed 2 of 128 test cells, both for the worse (1.22x), and missed the
            runaway it was made for: ordinary corrections reach 20 times the first-order
            step at the last steps, so the pilot's largest ratio sets a limit of 29.7 there.
        envelope_margin: each choice gets a per-step envelope calibrated on the pilot:
            at every step, this factor times the largest norm of the correction beyond the
            first-order step (``||x_t - x1||``, not its ratio to ``||x1 - x_s||``) that any
            pilot row makes there under the chosen recipe, run as the profile samples (norm
            cap and step limit included) (:attr:`~dpmsolver.recipe.Recipe.step_envelope`;
            :class:`~dpmsolver.steplimit.StepLimit`). No pilot row reaches it, so it changes
            neither the choice nor its pilot errors; it binds only on a sample whose
            correction outgrows every pilot row's at the same step by the margin (None: no
            envelope; a study, ``benchmarks/correction_envelope.md``). Two runaway samples
            on selection problems stood out from the 511 other new samples by this measure
            (1.9x and 19x the pilot's largest at the step they started, where the others
            reached at most 1.2x and 9.9x), while their correction ratios did not. On the
            fifth round at 12-25 NFE, a margin of 2 rescued 4 cells from 4.7-12x the best
            peer to 0.23-1.8x, but made 10 new-noise cells and 1 test cell more than 5%
            worse (up to 1.44x; a heavy-tailed ordinary sample clipped at one step), so it
            is off by default.
        envelope_persistence: the envelope binds on a sample only once its correction has
            been over it at this many consecutive steps, and from then on at every step
            (default 1: wherever it is over; :class:`~dpmsolver.steplimit.StepLimit`). Tried
            after the fifth round's study: a runaway's excess grows from step to step,
            while the ordinary sample that study clipped was over the envelope at one step.
            At 2 it spared the test set, but ordinary new samples over the envelope at two
            steps in a row cost up to 1.48x, so the envelope stays off.
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
    correction_refine: int = 0
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
    step_limit_margin: float | None = None
    envelope_margin: float | None = None
    envelope_persistence: int = 1
    extrapolate_final: bool = True
    tail_rows: int = 8
    tail_factor: float = 2.0
    tail_ranking: float | None = 2.0
    tail_trigger: str = "always"
    guard_rule: str = "paired_mse"
    guard_z: float = 2.0
    guard_fallback: bool = False
    tail_walk_back: bool = True
    tail_accept: bool = False
    tail_accept_capped: bool = False
    micro_batch: int | None = None
    merge_lanes: int | None = None
    memo_mb: int = 256
    sample_options: SampleOptions | None = None

    def __post_init__(self) -> None:
        for name, minimum in _COUNTS.items():
            check_int(name, getattr(self, name), minimum=minimum)
        for name, minimum in _OPTIONAL_COUNTS.items():
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=minimum)
        for name in _POSITIVE:
            check_finite_float(name, getattr(self, name), positive=True)
        for name in _OPTIONAL_POSITIVE:
            if getattr(self, name) is not None:
                check_finite_float(name, getattr(self, name), positive=True)
        for name in _AT_LEAST_ONE:
            value = getattr(self, name)
            if value is not None and value < 1.0:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        for name in _FLAGS:
            check_choice(name, getattr(self, name), (True, False))
        for name, accepted in _CHOICES.items():
            check_choice(name, getattr(self, name), accepted)
        for name in ("step_limit", "step_limit_margin", "envelope_margin"):
            check_step_limit(getattr(self, name), name)
        check_finite_float("v3_min_guidance", self.v3_min_guidance)
        check_finite_float("accept_z", self.accept_z)
        # the bounds a minimum alone does not say
        if 0 < self.v3_points < 8:
            raise ValueError(f"v3_points must be 0 (off) or at least 8, got {self.v3_points}")
        if self.correction_components > MAX_COMPONENTS:
            raise ValueError(
                f"correction_components must be 0 to {MAX_COMPONENTS}, "
                f"got {self.correction_components}"
            )
        if self.accept_z < 0.0:
            raise ValueError(f"accept_z must be >= 0, got {self.accept_z}")
        if self.guard_factor <= 1.0:
            raise ValueError(f"guard_factor must be > 1, got {self.guard_factor}")
        if self.tail_accept_capped and not self.tail_accept:
            raise ValueError(
                "tail_accept_capped=True needs tail_accept=True, got tail_accept=False"
            )


#: :class:`TuneOptions`' integer options and their smallest values.
_COUNTS: dict[str, int] = {
    "check_rows": 1,
    "v3_points": 0,
    "screen_rows": 1,
    "finalists": 1,
    "fine_knots": 4,
    "fine_rows": 1,
    "refine_runs": 0,
    "refine_rows": 1,
    "shift_runs": 0,
    "shift_rows": 1,
    "compensation_runs": 0,
    "compensation_rows": 1,
    "compensation_max_nfe": 1,
    "compensation_knots": 2,
    "correction_components": 0,
    "correction_rows": 1,
    "correction_max_nfe": 1,
    "correction_refine": 0,
    "order_rows": 1,
    "order_max_nfe": 1,
    "corrector_rows": 1,
    "corrector_max_nfe": 1,
    "step_bases": 1,
    "probe_pairs": 0,
    "probe_levels": 1,
    "guard_rows": 0,
    "envelope_persistence": 1,
    "tail_rows": 0,
    "memo_mb": 0,
}
#: Integer options that may be None (off or automatic), and their smallest values.
_OPTIONAL_COUNTS: dict[str, int] = {"v3_max_nfe": 1, "micro_batch": 1, "merge_lanes": 0}
#: Options that are positive finite numbers; and those that may also be None.
_POSITIVE = (
    "rtol",
    "shift_bound",
    "compensation_bound",
    "guard_factor",
    "guard_z",
    "tail_factor",
)
_OPTIONAL_POSITIVE = ("flow_sigma_max", "worst_factor", "step_ratio", "norm_cap", "tail_ranking")
#: Factors that must be at least 1 where given (None: off).
_AT_LEAST_ONE = ("step_ratio", "norm_cap", "tail_ranking")
#: Options that are True or False.
_FLAGS = (
    "order_search",
    "corrector_search",
    "extrapolate_final",
    "tail_walk_back",
    "tail_accept",
    "tail_accept_capped",
    "guard_fallback",
)
#: Options with named values, and the accepted ones.
_CHOICES: dict[str, tuple[str, ...]] = {
    "v3_noise": V3_NOISES,
    "rank_rows": RANK_ROWS,
    "tail_trigger": TAIL_TRIGGERS,
    "guard_rule": GUARD_RULES,
}


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
