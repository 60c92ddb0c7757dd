"""A diffusers scheduler driven by dpmsolver's solvers.

``pipe.scheduler = DPMSolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")``
swaps any Stable-Diffusion-style (eps / v, zero-terminal-SNR) or flow-matching pipeline onto
any registered solver, or onto ``solver="auto"``. The scheduler is a thin adapter: it builds
the time grid the way diffusers does (:mod:`.diffusers_grid`), plans the solver's steps over
it (:mod:`dpmsolver.plan`), and compiles the plan once per ``set_timesteps``
(:func:`.stepper.compile_steps`): the solver's own step runs on symbolic inputs, so each
evaluation's update is known as a few coefficients taken from the solver core, and
:meth:`DPMSolverScheduler.step` is a handful of fused tensor updates. Singlestep solvers
get their intermediate points listed in ``timesteps`` (diffusers calls the network once per
timestep).

How a config maps to a solver (:meth:`DPMSolverScheduler.from_config`):

- ``solver=`` names any registry name, alias or policy (``"auto"``). Without it, a config of
  an algorithm we run (DPM-Solver multistep / singlestep, UniPC, DEIS) selects that
  algorithm (:data:`PEER_SOLVERS`); any other config (DDIM, PNDM, Euler, flow matching, ...)
  describes a noise schedule only and gets the default solver.
- A config's algorithm options apply only to a solver of the same family
  (:func:`solver_family`): its ``solver_order`` (when the solver accepts it), UniPC's
  ``predict_x0``, ``disable_corrector`` and its lower-order rule. Any other solver runs at
  its own default order. ``solver_type`` applies where it names the solver's update
  (DPM-Solver's ``midpoint`` / ``heun``, with diffusers' reading of ``bh1`` / ``bh2`` /
  ``logrho`` as ``midpoint``; UniPC's ``bh1`` / ``bh2``) and is ignored elsewhere.
  Other algorithms' keys (``algorithm_type``, ``predict_x0``, ``disable_corrector``,
  ``solver_p``, PNDM's ``skip_prk_steps``, DDIM's ``clip_sample``, ...) never reach a solver
  that has no such option; UniPC's ``solver_p`` (another scheduler as predictor) is not
  followed: ``"unipc"`` runs its own UniP predictor.
- The grid is the config's whatever the solver: UniPC and DEIS configs keep their own
  timestep conventions (``grid_convention``), and a DEIS config ends where
  ``DEISMultistepScheduler`` does (the least noisy training level, ``sigma_min``).

Requires diffusers (``pip install diffusers``); nothing else in dpmsolver does.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import torch
from torch import Tensor

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as err:  # pragma: no cover - exercised only without diffusers
    raise ImportError(
        "dpmsolver.frontends.diffusers_scheduler needs diffusers; install it with "
        "`pip install diffusers`"
    ) from err

from .. import auto as _auto  # noqa: F401  (registers the "auto" policy)
from .._validate import check_choice, check_finite_float, check_int
from ..compensation import Compensation
from ..correction import Correction
from ..guidance import DynamicThresholding, NormCap
from ..loop import FinalStep
from ..parameterization import Prediction, data_coefficients
from ..plan import lower_order_final_default, solver_orders
from ..recipe import DEFAULT_STEPS, POLICIES, PolicyRequest, Recipe, resolve
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule, RectifiedFlowSchedule
from ..solvers import (
    ALIASES,
    REGISTRY,
    AdaptiveDPMSolver,
    FastDPMSolver,
    MultistepDPMSolver,
    MultistepSolver,
    SinglestepDPMSolver,
    Solver,
    get_solver,
)
from ..steplimit import StepLimit
from . import diffusers_grid as dg
from .stepper import (
    CompiledStepper,
    DrivenStep,
    PinnedSchedule,
    Program,
    ReplayingStepper,
    compile_steps,
    grouped_plan,
    probed_plan,
    supports_fractions,
)

if TYPE_CHECKING:
    from ..tune import Profile

__all__ = [
    "PEER_SOLVERS",
    "PREDICTION_TYPES",
    "DPMSolverInverseScheduler",
    "DPMSolverScheduler",
    "solver_family",
]

PREDICTION_TYPES: dict[str, Prediction] = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "flow_prediction": "flow",
}

DEFAULT_SOLVER = "dpmpp_multistep"

# Which solver a diffusers config asks for, when ``from_config`` is not told one:
# (scheduler class, algorithm_type) -> registry name or alias ("" matches any
# algorithm_type). Other configs (PNDM, Euler, flow matching, ...) describe a noise schedule
# only and get the default solver. "sde-dpmsolver++" multistep is the same algorithm, with
# the noise drawn as diffusers draws it (one randn_tensor per step: the same generator gives
# the same samples); the noise-prediction and singlestep SDEs map to the closest registered
# stochastic solvers, which are not diffusers' update draw for draw.
PEER_SOLVERS: dict[tuple[str, str], str] = {
    ("DPMSolverMultistepScheduler", "dpmsolver++"): "dpmpp_multistep",
    ("DPMSolverMultistepScheduler", "dpmsolver"): "dpm_multistep",
    ("DPMSolverMultistepScheduler", "sde-dpmsolver++"): "dpmpp_multistep_sde",
    ("DPMSolverMultistepScheduler", "sde-dpmsolver"): "dpmpp_multistep_sde",
    ("DPMSolverMultistepInverseScheduler", "dpmsolver++"): "dpmpp_multistep",
    ("DPMSolverMultistepInverseScheduler", "dpmsolver"): "dpm_multistep",
    ("DPMSolverMultistepInverseScheduler", "sde-dpmsolver++"): "dpmpp_multistep_sde",
    ("DPMSolverMultistepInverseScheduler", "sde-dpmsolver"): "dpmpp_multistep_sde",
    ("DPMSolverSinglestepScheduler", "dpmsolver++"): "dpmpp_singlestep",
    ("DPMSolverSinglestepScheduler", "dpmsolver"): "dpm_singlestep",
    ("DPMSolverSinglestepScheduler", "sde-dpmsolver++"): "dpmpp_2s_sde",
    ("UniPCMultistepScheduler", ""): "unipc",
    ("DEISMultistepScheduler", ""): "deis",
}

# The algorithm family of each peer scheduler class, and of the registered solvers that
# run the same algorithm (see solver_family); any other solver is a family of its own.
_SOURCE_FAMILIES = {
    "DPMSolverMultistepScheduler": "dpmsolver_multistep",
    "DPMSolverMultistepInverseScheduler": "dpmsolver_multistep",
    "DPMSolverSinglestepScheduler": "dpmsolver_singlestep",
    "UniPCMultistepScheduler": "unipc",
    "DEISMultistepScheduler": "deis",
}
_SOLVER_FAMILIES = {
    "dpmpp_multistep": "dpmsolver_multistep",
    "dpm_multistep": "dpmsolver_multistep",
    "dpmpp_multistep_sde": "dpmsolver_multistep",
    "dpmpp_singlestep": "dpmsolver_singlestep",
    "dpm_singlestep": "dpmsolver_singlestep",
    "dpmpp_2s_sde": "dpmsolver_singlestep",
}
_OURS = ("DPMSolverScheduler", "DPMSolverInverseScheduler")

# diffusers' ``solver_type`` values, and what each means for a solver with a ``variant``:
# the DPM-Solver family reads UniPC's and DEIS' names as "midpoint" (as diffusers' DPM
# schedulers do); UniPC takes "bh1" / "bh2" and keeps its default otherwise.
SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2", "logrho")
_DPM_SOLVER_TYPES = {
    "midpoint": "midpoint",
    "heun": "heun",
    "bh1": "midpoint",
    "bh2": "midpoint",
    "logrho": "midpoint",
}

# DDPM-style configs name their sampling variance; ODE solvers use none of them, and a
# network that learned its variance outputs extra channels, which are dropped.
_FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")
_LEARNED_VARIANCES = ("learned", "learned_range")

GridConvention = Literal["dpmsolver", "unipc", "deis"]
GRID_CONVENTIONS: tuple[GridConvention, ...] = ("dpmsolver", "unipc", "deis")

_COMPATIBLES = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverMultistepInverseScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
]


def _base_name(solver: str) -> str:
    return ALIASES[solver][0] if solver in ALIASES else solver


def _fixes_order(solver: str) -> bool:
    return solver in ALIASES and "order" in ALIASES[solver][1]


def solver_family(solver: str) -> str:
    """The algorithm family of a registry name, alias or policy: the algorithm of one of
    diffusers' schedulers (``"dpmsolver_multistep"``: DPM-Solver(++) multistep, its SDE
    form included; ``"dpmsolver_singlestep"``; ``"unipc"``; ``"deis"``), else the registry
    (or policy) name itself. A config's algorithm options (its order, UniPC's corrector
    settings) apply only within a family: DPM-Solver-fast, momentum or adaptive solvers,
    whose orders mean something else, keep their own."""
    base = _base_name(solver)
    return _SOLVER_FAMILIES.get(base, base)


def _accepted_orders(solver: str) -> tuple[int, ...]:
    base = _base_name(solver)
    return REGISTRY[base].orders if base in REGISTRY else ()


def _source_class(cfg: Mapping[str, Any]) -> str:
    """The diffusers scheduler a config came from: its ``_class_name`` (configs loaded from
    disk carry it), else recognised by its keys (in-memory configs of schedulers built in
    code do not)."""
    if "_class_name" in cfg:
        return str(cfg["_class_name"])
    if "solver" in cfg and "singlestep_layout" in cfg:
        return "DPMSolverScheduler"
    if "predict_x0" in cfg and "disable_corrector" in cfg:
        return "UniPCMultistepScheduler"
    if cfg.get("algorithm_type") == "deis" or cfg.get("solver_type") == "logrho":
        return "DEISMultistepScheduler"
    if "algorithm_type" in cfg and "solver_order" in cfg:
        # Only the multistep schedulers have euler_at_final.
        return (
            "DPMSolverMultistepScheduler"
            if "euler_at_final" in cfg
            else "DPMSolverSinglestepScheduler"
        )
    if "shift" in cfg and "beta_schedule" not in cfg and "prediction_type" not in cfg:
        return "FlowMatchEulerDiscreteScheduler"
    return ""


class _Thresholding(DynamicThresholding):
    """Dynamic thresholding with diffusers' accepted range: any ``sample_max_value > 0``.
    Below 1 diffusers' ``clamp(s, 1, max)`` gives ``max`` (torch.clamp with min > max), a
    fixed clip to ``[-max, max]`` rescaled to ``[-1, 1]``; the inherited
    :meth:`~dpmsolver.guidance.DynamicThresholding.threshold` does exactly that."""

    def __init__(self, ratio: float, max_value: float) -> None:
        super().__init__(_no_denoiser, ratio, 1.0)
        self.max_value = check_finite_float("sample_max_value", max_value, positive=True)


def _no_denoiser(x: Tensor, knot: Knot) -> Tensor:
    raise RuntimeError(
        "the scheduler thresholds or caps data predictions it is given; it never denoises"
    )


def _continuous_time(knot: Knot) -> float:
    """``timestep_type="continuous"``: the network time ``0.25 log(sigma~)``, in float32 as
    EulerDiscreteScheduler computes it."""
    return float(torch.tensor(knot.ksigma, dtype=torch.float32).log() * 0.25)


def _floats(seq: Sequence[float] | Tensor) -> list[float]:
    """Custom ``timesteps`` / ``sigmas`` (a sequence or tensor of any shape) as float64
    Python floats."""
    return [float(v) for v in torch.as_tensor(seq, dtype=torch.float64).flatten().tolist()]


def _values(seq: Sequence[float] | None) -> tuple[float, ...] | None:
    if seq is None:
        return None
    return tuple(_floats(seq))


@dataclasses.dataclass
class _Prepared:
    """What ``set_timesteps`` builds for one set of arguments under one config."""

    config: Any
    solver: Solver
    layout: str
    orders: list[int] | None
    knots: list[Knot]
    pinned: NoiseSchedule
    full_plan: list[DrivenStep]
    compiled: dict[int, Program]
    times: list[float]
    levels: list[float]
    order: int
    cap: NormCap | None = None
    limit: StepLimit | None = None
    extrapolate: bool = False
    compensation: tuple[float, ...] | None = None
    correction: tuple[tuple[float, ...], ...] | None = None


class DPMSolverScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffusers scheduler running any registered dpmsolver solver.

    Configuration (every key is saved by ``save_pretrained``; the diffusers keys mean what
    they mean in ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` /
    ``FlowMatchEulerDiscreteScheduler``):

    Args:
        solver: registry name, alias or policy (default ``"dpmpp_multistep"``; e.g.
            ``"dpmpp_2m"``, ``"dpmpp_3m"``, ``"unipc"``, ``"dpmpp_2s"``, ``"dpm_fast"``,
            ``"auto"``; see ``dpmsolver.solvers``). ``"auto"`` resolves the recipe for
            ``num_inference_steps`` network evaluations and ``guidance_scale`` at
            ``set_timesteps`` (:mod:`dpmsolver.auto`): its solver, its grid and where it
            stops, on VP schedules; its solver on the config's grid for flow schedules,
            custom timesteps and inversion. Adaptive solvers run their higher-order update
            at fixed steps (their error control needs a loop that chooses the steps).
        solver_order: the solver's order (default: the solver's own default).
        solver_options: extra solver options, e.g. ``{"third_order": "legacy"}``.
        solver_type: diffusers' name for the second-order update (default ``"midpoint"``):
            ``"midpoint"`` / ``"heun"`` for the DPM-Solver family (``"bh1"``, ``"bh2"``,
            ``"logrho"`` read as ``"midpoint"``), ``"bh1"`` / ``"bh2"`` for UniPC; ignored
            by solvers without that choice, and by ``solver_options["variant"]``.
        singlestep_layout: where a singlestep solver evaluates: ``"grid"`` (each timestep is
            an evaluation and a step of order k spans k timesteps, as
            ``DPMSolverSinglestepScheduler``; ``num_inference_steps`` counts evaluations) or
            ``"solver"`` (the solver places its own intermediate points, which are inserted
            into ``timesteps``; ``num_inference_steps`` counts steps). Default: ``"grid"``
            for solvers whose intermediate points are options, else ``"solver"``.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the
            DDPM training schedule (defaults 1000, 0.0001, 0.02, ``"linear"``, None).
        rescale_betas_zero_snr: zero terminal SNR (Lin et al. 2023, Alg. 1; default False).
        prediction_type: ``"epsilon"`` (default), ``"sample"``, ``"v_prediction"`` or
            ``"flow_prediction"`` (a rectified-flow model; the schedule is then a flow one).
        variance_type: ``"learned"`` / ``"learned_range"`` for networks that also output a
            variance (its channels are dropped); DDPM's ``"fixed_*"`` values are accepted and
            change nothing. Default None.
        thresholding, dynamic_thresholding_ratio, sample_max_value: dynamic thresholding of
            the data prediction (Imagen, Sec. 2.3; defaults False, 0.995, 1.0). As in
            diffusers, a ``sample_max_value`` below 1 clips to ``[-max, max]`` and rescales.
        timestep_spacing: ``"linspace"`` (default), ``"leading"`` or ``"trailing"``.
        steps_offset: offset of ``"leading"`` timesteps (default 0).
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas, use_beta_sigmas: Karras,
            exponential, log-SNR-uniform or Beta(0.6, 0.6) noise levels instead of spaced
            timesteps (at most one; default all False; beta needs scipy, as in diffusers).
        final_sigmas_type: ``"zero"`` (default: the last step goes to sigma = 0) or
            ``"sigma_min"`` (stop at the least noisy training level).
        lambda_min_clipped: skip timesteps whose half log-SNR is below this (default -inf).
        lower_order_final: lower the order of the last steps (multistep: only below 15
            steps, as diffusers' DPM-Solver and DEIS; default True). euler_at_final: last
            step first order.
        lower_order_final_always: with ``lower_order_final``, lower the last orders whatever
            the number of steps (``UniPCMultistepScheduler``'s rule; a UniPC config sets it
            for UniPC; default False).
        disable_corrector: timestep indices whose result a predictor-corrector solver
            (UniPC) leaves uncorrected, as ``UniPCMultistepScheduler`` (default none).
        use_flow_sigmas, flow_shift: ``DPMSolverMultistepScheduler``'s / UniPC's / DEIS'
            flow-matching grid.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, time_shift_type, shift_terminal:
            ``FlowMatchEulerDiscreteScheduler``'s flow-matching grid (pipelines read the
            ``*_seq_len`` / ``*_shift`` keys to compute ``mu``). ``invert_sigmas`` and
            ``stochastic_sampling`` must be False.
        timestep_type: ``"discrete"`` (default) or ``"continuous"``: with
            ``v_prediction`` the network takes ``0.25 log(sigma/alpha)`` as its time, as in
            ``EulerDiscreteScheduler`` (EDM-style networks).
        grid_convention: whose small differences in building the grid to follow,
            ``"dpmsolver"`` (default), ``"unipc"`` or ``"deis"`` (set by ``from_config``
            from the config's scheduler): UniPC's flow levels start at ``1 - 1e-6`` and
            its and DEIS' ``"sigma_min"`` flow grids repeat their last level; only
            DPM-Solver truncates the Karras / log-SNR network times of the cosine schedule.
        guidance_scale: the classifier-free guidance scale ``solver="auto"`` plans for
            (default 7.5, Stable Diffusion pipelines' default). A pipeline does not tell its
            scheduler the scale it samples with, so set it to match, e.g.
            ``from_config(config, solver="auto", guidance_scale=5.0)``. Unused otherwise.
        profile: with ``solver="auto"``, recipes fitted to the pipeline's model
            (:func:`dpmsolver.tune`): a :class:`~dpmsolver.tune.Profile`, a path to one or
            its JSON data; its choice for ``num_inference_steps`` at ``guidance_scale``
            runs (a budget it lacks: the default recipe, with a warning). Checked against
            the config's schedule and prediction; kept in the config as JSON.
        differentiable: keep autograd through :meth:`step` (default False: a step runs
            under ``torch.no_grad()`` and keeps no graph, even if the caller forgot it;
            diffusers pipelines sample under ``no_grad``). Set it to differentiate through
            the sampler.
    """

    _compatibles = _COMPATIBLES
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        solver: str = DEFAULT_SOLVER,
        solver_order: int | None = None,
        solver_options: Mapping[str, Any] | None = None,
        solver_type: str | None = "midpoint",
        singlestep_layout: Literal["grid", "solver"] | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
        variance_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_beta_sigmas: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        invert_sigmas: bool = False,
        stochastic_sampling: bool = False,
        lower_order_final_always: bool = False,
        disable_corrector: Sequence[int] = (),
        grid_convention: str = "dpmsolver",
        guidance_scale: float = 7.5,
        differentiable: bool = False,
        timestep_type: str = "discrete",
        profile: Any = None,
    ) -> None:
        check_choice("prediction_type", prediction_type, tuple(PREDICTION_TYPES))
        check_choice("variance_type", variance_type, (None, *_FIXED_VARIANCES, *_LEARNED_VARIANCES))
        check_choice("timestep_spacing", timestep_spacing, dg.TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        check_choice("singlestep_layout", singlestep_layout, (None, "grid", "solver"))
        check_choice("grid_convention", grid_convention, GRID_CONVENTIONS)
        check_choice("solver_type", solver_type, (None, *SOLVER_TYPES))
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_finite_float("guidance_scale", guidance_scale)
        for name, value in (
            ("invert_sigmas", invert_sigmas),
            ("stochastic_sampling", stochastic_sampling),
        ):
            check_choice(name, value, (False,))
        disabled = [
            check_int(f"disable_corrector[{i}]", v, minimum=0)
            for i, v in enumerate(disable_corrector or ())
        ]
        self._disabled_corrections = frozenset(disabled)
        self._record(disable_corrector=disabled)  # a list, as diffusers keeps it
        spacings = [
            n
            for n, on in (
                ("use_karras_sigmas", use_karras_sigmas),
                ("use_exponential_sigmas", use_exponential_sigmas),
                ("use_lu_lambdas", use_lu_lambdas),
                ("use_beta_sigmas", use_beta_sigmas),
            )
            if on
        ]
        if len(spacings) > 1:
            raise ValueError(
                f"{' and '.join(spacings)} are all set; set at most one of use_karras_sigmas, "
                "use_exponential_sigmas, use_lu_lambdas, use_beta_sigmas"
            )
        self._sigma_spacing: dg.SigmaSpacing = {
            "use_karras_sigmas": "karras",
            "use_exponential_sigmas": "exponential",
            "use_lu_lambdas": "logsnr",
            "use_beta_sigmas": "beta",
        }.get(spacings[0] if spacings else "", "timesteps")  # type: ignore[assignment]
        check_int("num_train_timesteps", num_train_timesteps, minimum=2)

        self._policy = solver in POLICIES
        self._profile = _load_profile(profile)
        if self._profile is not None:
            if solver != "auto":
                raise ValueError(
                    f"profile= holds recipes for solver='auto', not solver={solver!r}; drop one"
                )
            self._record(profile=self._profile.to_json())  # JSON: save_config keeps it
        if self._policy:
            if solver_order is not None or solver_options:
                raise ValueError(
                    f"solver={solver!r} chooses the solver and its options; do not pass "
                    "solver_order or solver_options (name a registry solver to set them)"
                )
        self._prediction: Prediction = PREDICTION_TYPES[prediction_type]
        self._threshold = (
            _Thresholding(dynamic_thresholding_ratio, sample_max_value) if thresholding else None
        )
        self._cap: NormCap | None = None  # a profile recipe's (set with the timesteps)
        self._limit: StepLimit | None = None  # likewise
        self._extrapolate = False  # likewise: its step into sigma = 0 is extrapolated
        self._compensation: tuple[float, ...] | None = None  # likewise (stage (f)'s ratios)
        self._comp: Compensation | None = None  # the run's, from its first step
        self._correction: tuple[tuple[float, ...], ...] | None = None  # likewise (stage (g))
        self._corr: Correction | None = None  # the run's, made at its first step's start
        # with any of them: the run's (plan position, step, evaluation in it) by evaluation
        # position, the step start seen, and the final step's memory of the data
        # predictions at the steps' starts
        self._track_steps: list[tuple[int, DrivenStep, int]] = []
        self._track_start: tuple[Tensor, Tensor | None] | None = None
        self._track_base = 0
        self._end_step: FinalStep | None = None
        self._learned_variance = variance_type in _LEARNED_VARIANCES

        self.is_flow = prediction_type == "flow_prediction"
        # EulerDiscreteScheduler's EDM-style v-prediction networks take 0.25 log(sigma~).
        self._continuous = timestep_type == "continuous" and prediction_type == "v_prediction"
        self.schedule: NoiseSchedule
        self._flow: RectifiedFlowSchedule | None = None
        if self.is_flow:
            # Unshifted: the grid's levels carry the shift (see diffusers_grid).
            self._flow = RectifiedFlowSchedule(
                shift=1.0,
                t_min=0.5 / num_train_timesteps,
                model_time_scale=float(num_train_timesteps),
            )
            self.schedule = self._flow
        else:
            acp = dg.diffusers_alphas_cumprod(
                num_train_timesteps,
                beta_start,
                beta_end,
                beta_schedule,
                trained_betas,
                rescale_betas_zero_snr,
            )
            self.schedule = DiscreteVPSchedule(alphas_cumprod=acp)

        self.solver: Solver
        self._layout: str
        if self._policy:
            # a placeholder until set_timesteps names the budget (the default policy's, so
            # that a profile without this budget does not warn)
            if self._profile is not None:
                self._profile.check(self.schedule, self._prediction)
            request = PolicyRequest(DEFAULT_STEPS, float(guidance_scale), self.schedule)
            self._use(resolve(str(solver), request).build_solver(), singlestep_layout)
        else:
            built = self._build_solver(solver, solver_order, solver_options, solver_type)
            self._use(built, singlestep_layout)
            # Record what is actually used, so the saved config also loads into diffusers'
            # schedulers of the same algorithm (which need an integer solver_order and a
            # solver_type of their own).
            self._record(solver_order=self.solver.order)
            variant = getattr(self.solver, "variant", None)
            if variant in SOLVER_TYPES:
                self._record(solver_type=variant)

        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.zeros(0)
        self._knots: list[Knot] | None = None
        self._full_plan: list[DrivenStep] = []
        self._orders: list[int] | None = None
        self._pinned: NoiseSchedule = self.schedule
        self._compiled: dict[int, Program] = {}
        self._prepared: dict[tuple[Any, ...], _Prepared] = {}
        self._stepper: CompiledStepper | ReplayingStepper | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._generator: torch.Generator | None = None
        self._variance_noise: Tensor | None = None

    # ------------------------------------------------------------------ configuration

    def _record(self, **values: Any) -> None:
        """Put values actually used into the config, and take them off diffusers' list of
        defaults (which ``from_config`` of another class would otherwise drop)."""
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in values]
        self.register_to_config(**values)
        if "_use_default_values" in self.config:
            self.register_to_config(_use_default_values=defaults)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Build from any compatible diffusers config (``ConfigMixin.from_config``) with the
        mapping rules of the module docstring: ``solver=`` (or the config's own algorithm,
        :data:`PEER_SOLVERS`); the config's order and algorithm options only within the
        solver's family; the config's grid, a ``FlowMatch*`` config meaning
        ``prediction_type="flow_prediction"``. Keyword arguments override the config."""
        if config is None:
            raise ValueError("from_config needs a config (e.g. pipe.scheduler.config)")
        cfg = dict(config)
        source = _source_class(cfg)
        if source in _OURS:
            source_family: str | None = solver_family(str(cfg.get("solver", DEFAULT_SOLVER)))
        else:
            source_family = _SOURCE_FAMILIES.get(source)
        # diffusers lists the keys a scheduler left at its defaults, and from_config drops
        # them so that the new class applies its own (SD v1's PNDM config thus gives
        # DPMSolver's "linspace" spacing, not PNDM's "leading"); so does this scheduler.
        # A config of an algorithm we run is translated to that algorithm, so there its
        # values are the behaviour to keep (DPMSolverSinglestepScheduler's
        # lower_order_final=False).
        if source_family is not None:
            cfg.pop("_use_default_values", None)
        if "solver" in kwargs:
            solver = str(kwargs["solver"])
        elif "solver" in cfg:
            solver = str(cfg["solver"])
        else:
            algorithm = str(cfg.get("algorithm_type", "dpmsolver++"))
            solver = PEER_SOLVERS.get(
                (source, algorithm), PEER_SOLVERS.get((source, ""), DEFAULT_SOLVER)
            )
            kwargs["solver"] = solver
        same = source_family is not None and source_family == solver_family(solver)
        if "solver_order" not in kwargs and (
            not same
            or _fixes_order(solver)
            or cfg.get("solver_order") not in _accepted_orders(solver)
        ):
            cfg.pop("solver_order", None)
        if "solver_options" not in kwargs and _base_name(solver) != _base_name(
            str(cfg.get("solver", solver))
        ):
            cfg.pop("solver_options", None)  # a saved config's options of another solver
        if source in _OURS and not same:
            cfg.pop("lower_order_final_always", None)
            cfg.pop("disable_corrector", None)
        if source == "UniPCMultistepScheduler":
            cfg.setdefault("grid_convention", "unipc")
            if same and "solver_options" not in kwargs and not cfg.get("predict_x0", True):
                kwargs["solver_options"] = {"form": "noise"}
            if same:
                cfg.setdefault("lower_order_final_always", True)
            else:
                cfg.pop("disable_corrector", None)
        if source == "DEISMultistepScheduler":
            cfg.setdefault("grid_convention", "deis")
            # DEIS ends at the least noisy training level (its sigma_last), never at 0.
            cfg.setdefault("final_sigmas_type", "sigma_min")
        if source.startswith("FlowMatch") and "prediction_type" not in kwargs:
            kwargs["prediction_type"] = "flow_prediction"
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @staticmethod
    def _build_solver(
        name: str, order: int | None, options: Mapping[str, Any] | None, solver_type: str | None
    ) -> Solver:
        check_choice("solver", name, [*POLICIES, *sorted(REGISTRY), *sorted(ALIASES)])
        opts = dict(options or {})
        registered = _base_name(name)
        fixed = ALIASES[name][1] if name in ALIASES else {}
        if (
            solver_type is not None
            and "variant" in REGISTRY[registered].options
            and "variant" not in fixed
        ):
            if registered.startswith(("dpmpp_", "dpm_")):
                opts.setdefault("variant", _DPM_SOLVER_TYPES[solver_type])
            elif registered == "unipc" and solver_type in ("bh1", "bh2"):
                opts.setdefault("variant", solver_type)
        if isinstance(opts.get("ems"), (str, os.PathLike)):
            # DPM-Solver-v3's statistics: a path keeps the config JSON (save_pretrained)
            from ..ems import EMS

            opts["ems"] = EMS.load(opts["ems"])
        return get_solver(name, order, **opts)

    def _use(self, solver: Solver, layout: str | None) -> None:
        """Make ``solver`` the one that runs, with its layout. An adaptive DPM-Solver runs
        its higher-order update at fixed steps (DPM-Solver-23: DPM-Solver-3, singlestep,
        midpoint form): its error control needs a loop that chooses the steps, and a
        pipeline's timesteps are fixed in advance."""
        if isinstance(solver, AdaptiveDPMSolver):
            solver = SinglestepDPMSolver(order=solver.order, form=solver.form)
        if isinstance(solver, MultistepSolver):
            resolved = "multistep"
        elif layout is None:
            resolved = "grid" if supports_fractions(solver) else "solver"
        elif layout == "grid" and not supports_fractions(solver):
            raise ValueError(
                f"singlestep_layout='grid' needs a solver whose intermediate points are options "
                f"r1/r2; {type(solver).__name__} places its own: use singlestep_layout='solver'"
            )
        else:
            resolved = layout
        self.solver, self._layout = solver, resolved

    def _resolve_policy(self, nfe: int) -> Recipe:
        """The policy's recipe for ``nfe`` evaluations at the configured guidance scale
        (the profile's, when one was given)."""
        w = float(self._cfg.guidance_scale)
        if self._profile is not None:
            return self._profile.recipe(nfe, w, self.schedule, self._prediction)
        return resolve(str(self._cfg.solver), PolicyRequest(nfe, w, self.schedule))

    @property
    def _cfg(self) -> Any:
        """The frozen config (diffusers types it as a dict; it has attribute access)."""
        return self.config

    # ------------------------------------------------------------------ protocol state

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next :meth:`step` (None before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first timestep, set by the pipeline (img2img starts mid-way)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at ``timesteps[begin_index]`` (called by pipelines before the loop)."""
        self._begin_index = check_int("begin_index", begin_index, minimum=0)
        self._stepper, self._step_index = None, None

    def __len__(self) -> int:
        return int(self._cfg.num_train_timesteps)

    @property
    def knots(self) -> list[Knot]:
        """The grid's knots (noise levels and network times), final knot included."""
        if self._knots is None:
            raise ValueError("call set_timesteps first")
        return list(self._knots)

    # ------------------------------------------------------------------ the grid

    def _final(self) -> dg.FinalSigma:
        return cast(dg.FinalSigma, self._cfg.final_sigmas_type)

    def _orient(self, knots: list[Knot]) -> list[Knot]:
        return knots

    def _flow_sigma_min(self, levels: Sequence[float] | np.ndarray) -> float:
        """Where a flow grid with ``final_sigmas_type="sigma_min"`` ends: UniPC and DEIS
        repeat their last level; otherwise the least noisy training level."""
        if self._cfg.grid_convention != "dpmsolver" and self._cfg.use_flow_sigmas:
            return float(levels[-1])
        n_train = self._cfg.num_train_timesteps
        v = 1.0 / n_train
        if self._cfg.use_dynamic_shifting:
            return v
        s = self._cfg.shift
        return s * v / (1 + (s - 1) * v)

    def _vp_final(self, final: str) -> Knot:
        return self.schedule.zero_knot() if final == "zero" else self.schedule.knot(0.0)

    def _grid(
        self,
        n: int | None,
        timesteps: Sequence[float] | None,
        sigmas: Sequence[float] | None,
        mu: float | None,
    ) -> list[Knot]:
        cfg, final = self._cfg, self._final()
        if timesteps is not None:
            vals = _floats(timesteps)
            if self._flow is not None:
                # Custom flow timesteps are the network times; their levels are t / N (unshifted).
                levels = [v / cfg.num_train_timesteps for v in vals]
                knots = dg.flow_knots(
                    self._flow,
                    levels,
                    num_train_timesteps=cfg.num_train_timesteps,
                    final=final,
                    sigma_min=self._flow_sigma_min(levels),
                )
                pinned = [
                    dataclasses.replace(k, model_t=v) for k, v in zip(knots, vals, strict=False)
                ]
                return [*pinned, knots[-1]]
            inner = [
                self.schedule.knot(self.schedule.check_time(f"timesteps[{i}]", v))
                for i, v in enumerate(vals)
            ]
            return [*inner, self._vp_final(final)]
        if self._flow is not None:
            levels_: Sequence[float] | np.ndarray
            if cfg.use_flow_sigmas and cfg.grid_convention == "unipc":
                levels_ = dg.unipc_flow_sigmas(
                    n,
                    num_train_timesteps=cfg.num_train_timesteps,
                    flow_shift=cfg.flow_shift,
                    use_dynamic_shifting=cfg.use_dynamic_shifting,
                    mu=mu,
                    time_shift_type=cfg.time_shift_type,
                    shift_terminal=cfg.shift_terminal,
                    sigmas=sigmas,
                )
                truncate = True
            elif cfg.use_flow_sigmas:
                shift = (
                    math.exp(mu)
                    if (cfg.use_dynamic_shifting and mu is not None)
                    else cfg.flow_shift
                )
                if n is None:
                    raise ValueError("custom sigmas need use_flow_sigmas=False for this grid")
                levels_ = dg.dpm_flow_sigmas(n, cfg.num_train_timesteps, shift)
                truncate = True
            else:
                levels_ = dg.flowmatch_sigmas(
                    n,
                    num_train_timesteps=cfg.num_train_timesteps,
                    shift=cfg.shift,
                    use_dynamic_shifting=cfg.use_dynamic_shifting,
                    mu=mu,
                    time_shift_type=cfg.time_shift_type,
                    shift_terminal=cfg.shift_terminal,
                    sigma_spacing=self._sigma_spacing,
                    sigmas=sigmas,
                )
                truncate = False
            return dg.flow_knots(
                self._flow,
                levels_,
                num_train_timesteps=cfg.num_train_timesteps,
                truncate=truncate,
                final=final,
                sigma_min=self._flow_sigma_min(levels_),
            )
        assert isinstance(self.schedule, DiscreteVPSchedule)
        if sigmas is not None:
            vals = _floats(sigmas)
            end = self.schedule.zero_knot() if vals and vals[-1] == 0.0 else self._vp_final(final)
            vals = vals[:-1] if vals and vals[-1] == 0.0 else vals
            inner = []
            for i, v in enumerate(vals):
                if not (math.isfinite(v) and v > 0):
                    raise ValueError(
                        f"sigmas[{i}]={v} must be finite and > 0 (a trailing 0 means sigma = 0)"
                    )
                k = self.schedule.knot_at_lambda(-math.log(v))
                self.schedule.check_time(f"sigmas[{i}] (as a timestep)", k.t)
                inner.append(k)
            return [*inner, end]
        assert n is not None
        return dg.vp_knots(
            self.schedule,
            n,
            spacing=cfg.timestep_spacing,
            sigmas=self._sigma_spacing,
            steps_offset=cfg.steps_offset,
            lambda_min_clipped=cfg.lambda_min_clipped,
            # Only diffusers' DPM-Solver schedulers truncate these for the cosine schedule.
            truncate=cfg.beta_schedule == "squaredcos_cap_v2"
            and cfg.grid_convention == "dpmsolver",
            final=final,
        )

    @staticmethod
    def _check_monotone(knots: Sequence[Knot]) -> None:
        lams = [k.lam for k in knots]
        diffs = [b - a for a, b in itertools.pairwise(lams)]
        # Zero-length steps are allowed at the ends only: diffusers' Karras / log-SNR grids
        # repeat sigma_min there.
        inner = diffs[1:-1] if len(diffs) > 2 else []
        up = all(d > 0 for d in inner) and all(d >= 0 for d in diffs)
        down = all(d < 0 for d in inner) and all(d <= 0 for d in diffs)
        if len(knots) < 2 or not (up or down) or all(d == 0 for d in diffs):
            shown = ", ".join(f"{v:.4g}" for v in lams[:8]) + (", ..." if len(lams) > 8 else "")
            raise ValueError(
                "the timesteps / sigmas must be strictly monotone in noise level (no repeats, "
                f"no reversals); got half log-SNRs {shown}"
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid, plan the steps and compile them (run before the loop).

        Args:
            num_inference_steps: number of grid steps; with ``singlestep_layout="grid"``
                this is the number of network evaluations (as diffusers' singlestep), and
                with ``solver="auto"`` the evaluation budget the recipe spends exactly.
            device: device for ``timesteps``.
            timesteps: custom network timesteps instead (decreasing).
            sigmas: custom noise levels instead: k-diffusion sigmas ``sigma/alpha`` for VP
                (a trailing 0 means the final step to sigma = 0), flow sigmas for flow
                matching (shifted like ``FlowMatchEulerDiscreteScheduler`` does).
            mu: dynamic-shift exponent for flow matching; used with ``use_dynamic_shifting``
                only (pipelines pass it regardless).
        """
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass at most one of timesteps and sigmas")
        custom = timesteps if timesteps is not None else sigmas
        if num_inference_steps is None and custom is None:
            raise ValueError("pass num_inference_steps, timesteps or sigmas")
        if num_inference_steps is not None:
            check_int("num_inference_steps", num_inference_steps, minimum=1)
            if custom is not None and len(custom) != num_inference_steps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} but {len(custom)} custom values "
                    "were given"
                )
        if not self._cfg.use_dynamic_shifting:
            mu = None  # Flux passes mu whatever the config; FlowMatchEuler ignores it too
        if (
            self._cfg.use_dynamic_shifting
            and self.is_flow
            and mu is None
            and not (self._cfg.use_flow_sigmas and self._cfg.grid_convention == "dpmsolver")
        ):
            raise ValueError(
                "use_dynamic_shifting=True needs mu in set_timesteps (as Flux / SD3 pass it)"
            )
        key = (num_inference_steps, _values(timesteps), _values(sigmas), mu)
        prepared = self._prepared.get(key)
        if prepared is None or prepared.config is not self.config:
            prepared = self._prepare(num_inference_steps, timesteps, sigmas, mu)
            self._prepared = {**dict(list(self._prepared.items())[-3:]), key: prepared}
        (self.solver, self._layout, self._orders, self._knots, self._pinned) = (
            prepared.solver,
            prepared.layout,
            prepared.orders,
            prepared.knots,
            prepared.pinned,
        )
        self._full_plan, self._compiled = prepared.full_plan, prepared.compiled
        self._cap, self._limit = prepared.cap, prepared.limit
        self._extrapolate = prepared.extrapolate
        self._compensation = prepared.compensation
        self._correction = prepared.correction
        integral = not self.is_flow and all(float(v).is_integer() for v in prepared.times)
        self.timesteps = torch.tensor(
            prepared.times, dtype=torch.int64 if integral else torch.float32, device=device
        )
        self.sigmas = torch.tensor(prepared.levels, dtype=torch.float32)
        self.num_inference_steps = len(prepared.times)
        self.order = prepared.order
        self._stepper, self._step_index, self._begin_index = None, None, None

    def _prepare(
        self,
        num_inference_steps: int | None,
        timesteps: Sequence[float] | None,
        sigmas: Sequence[float] | None,
        mu: float | None,
    ) -> _Prepared:
        """Grid, plan and compiled program for these arguments (cached by set_timesteps:
        pipelines set the same timesteps for every generation)."""
        custom = timesteps if timesteps is not None else sigmas
        self._orders = None
        recipe_knots: list[Knot] | None = None
        self._cap = self._limit = None
        self._extrapolate = False
        self._compensation = None
        self._correction = None
        if self._policy:
            budget = num_inference_steps if num_inference_steps is not None else len(custom or ())
            recipe = self._resolve_policy(budget)
            own_grid = custom is None and not self.is_flow and self._own_grid_allowed()
            if recipe.model_shifts is not None and (not own_grid or self._continuous):
                # the shifts belong to the recipe's own knots and the network's own times
                warnings.warn(
                    "the profile's model-time shifts are not applied here (they need the "
                    "recipe's own grid of a discrete-time model; this run has custom "
                    "timesteps/sigmas, flow matching or timestep_type='continuous'); tune "
                    "with shift_runs=0 (CLI: --shift-runs 0) for this pipeline",
                    stacklevel=3,
                )
                recipe = dataclasses.replace(recipe, model_shifts=None)
            # On its own grid the recipe's solver places its intermediate points and the
            # plan spends the budget exactly; on the config's grid every timestep is an
            # evaluation where the solver allows it (singlestep_layout's default).
            self._use(recipe.build_solver(), "solver" if own_grid else None)
            if recipe.x0_norm_cap is not None:
                self._cap = NormCap(_no_denoiser, recipe.x0_norm_cap)
            if not self.solver.stochastic:
                self._limit = recipe.step_limiter()
            self._extrapolate = recipe.final_step == "extrapolate" and not self.solver.stochastic
            if recipe.compensation is not None and not own_grid:
                warnings.warn(
                    "the profile's compensation of the data predictions is not applied here "
                    "(its ratios belong to the recipe's own steps; this run has custom "
                    "timesteps/sigmas or flow matching); tune with compensation_runs=0 "
                    "(CLI: --compensation-runs 0) for this pipeline",
                    stacklevel=3,
                )
            elif not self.solver.stochastic:
                self._compensation = recipe.compensation
            if recipe.correction is not None and not own_grid:
                warnings.warn(
                    "the profile's correction of the data predictions is not applied here "
                    "(its coordinates belong to the recipe's own steps; this run has custom "
                    "timesteps/sigmas or flow matching); tune with correction_components=0 "
                    "(CLI: --correction-components 0) for this pipeline",
                    stacklevel=3,
                )
            elif not self.solver.stochastic:
                self._correction = recipe.correction
            if own_grid:
                if self._final() == "sigma_min":
                    recipe = dataclasses.replace(recipe, final="t_min", sigma_end=None)
                # a profile's fitted knots imply the budget
                fixed = recipe.timesteps is not None
                plan = recipe.plan(self.schedule, nfe=None if fixed else budget, solver=self.solver)
                recipe_knots, self._orders = list(plan.grid.knots), plan.orders
        knots = self._orient(
            recipe_knots
            if recipe_knots is not None
            else self._grid(num_inference_steps, timesteps, sigmas, mu)
        )
        self._check_monotone(knots)
        network_time = _continuous_time if self._continuous else None
        if network_time is not None:
            knots = [
                dataclasses.replace(k, model_t=network_time(k)) if math.isfinite(k.lam) else k
                for k in knots
            ]
        self._knots = knots
        self._pinned = PinnedSchedule(self.schedule, knots, network_time)
        self._full_plan = self._plan(0)
        evals = [k for st in self._full_plan for k in st.evals]
        return _Prepared(
            config=self.config,
            solver=self.solver,
            layout=self._layout,
            orders=self._orders,
            knots=knots,
            pinned=self._pinned,
            full_plan=self._full_plan,
            compiled={0: self._compile(self._full_plan)} if self.solver.scalar_coefficients else {},
            times=[k.model_t for k in evals],
            levels=[self._level(k) for k in [*evals, knots[-1]]],
            order=self._evaluations_per_step(),
            cap=self._cap,
            limit=self._limit,
            extrapolate=self._extrapolate,
            compensation=self._compensation,
            correction=self._correction,
        )

    def _own_grid_allowed(self) -> bool:
        """A policy's recipe brings its own grid when sampling (not inverting)."""
        return True

    def _level(self, k: Knot) -> float:
        """The noise level in the peer schedulers' convention: flow sigma, or sigma/alpha."""
        if self.is_flow or k.lam == math.inf:
            return k.sigma
        return k.ksigma

    def _evaluations_per_step(self) -> int:
        """diffusers' ``order``: timesteps per step, which pipelines use to index timesteps
        (img2img's ``t_start * order``). 1 unless the solver inserts its own intermediate
        points and every step (but a final one) has the same number (like Heun's 2)."""
        if self._layout != "solver":
            return 1
        counts = {len(st.evals) for st in self._full_plan[:-1]} or {1}
        return counts.pop() if len(counts) == 1 else 1

    def _plan(self, start: int) -> list[DrivenStep]:
        """The steps over ``knots[start:]`` (``start`` is an interval index)."""
        assert self._knots is not None
        knots = self._knots[start:]
        n = len(knots) - 1
        final_zero = knots[-1].lam == math.inf
        # diffusers lowers the final orders of multistep solvers only below 15 steps
        # (UniPC: always).
        lof = bool(self._cfg.lower_order_final)
        if self._layout == "grid":
            steps = grouped_plan(self.solver, knots, self._groups(knots, lof, final_zero))
        else:
            if self._orders is not None and start == 0:
                orders = list(self._orders)
            else:
                always = bool(self._cfg.lower_order_final_always)
                steps_lof = lof and (always or lower_order_final_default(len(self._knots) - 1))
                orders = solver_orders(
                    self.solver, steps=n, final_zero=final_zero, lower_order_final=steps_lof
                )
            if self._cfg.euler_at_final:
                orders[-1] = 1
            steps = probed_plan(self.solver, knots, orders, self._pinned)
        if self._disabled_corrections:
            steps = self._mark_corrections(steps, start)
        return steps

    def _mark_corrections(self, steps: list[DrivenStep], start: int) -> list[DrivenStep]:
        """``disable_corrector``: diffusers' UniPC skips the correction at timestep index
        ``i`` when ``i - 1`` is listed (the result of step ``i - 1`` stays uncorrected)."""
        out, position = [], start
        for st in steps:
            if position - 1 in self._disabled_corrections:
                st = dataclasses.replace(st, corrector=False)
            out.append(st)
            position += len(st.evals)
        return out

    def _groups(self, knots: Sequence[Knot], lof: bool, final_zero: bool) -> list[int]:
        """Orders of grid-layout singlestep steps (each spans that many intervals)."""
        # First order out of pure noise; a zero-length first step (an inversion of diffusers'
        # repeated sigma_min) stands alone.
        head = [1] if math.isinf(knots[0].lam) or knots[0].lam == knots[1].lam else []
        body = len(knots) - 1 - len(head)
        groups: list[int] = []
        if body > 0:
            if isinstance(self.solver, FastDPMSolver):
                groups = self.solver.plan(
                    steps=None, nfe=body, final_zero=final_zero, lower_order_final=lof
                )
            else:
                groups = dg.singlestep_groups(
                    body, self.solver.order, lower_order_final=lof, final_zero=final_zero
                )
        out = head + groups
        # A step into pure noise (inversion) is first order; so is diffusers' zero-length
        # last step, which its order list leaves alone whenever it ends in a 1.
        if knots[-1].lam in (-math.inf, knots[-2].lam) and out[-1] > 1:
            out[-1:] = [out[-1] - 1, 1]
        if self._cfg.euler_at_final and out[-1] > 1:
            out[-1:] = [out[-1] - 1, 1]
        return out

    def _compile(self, steps: Sequence[DrivenStep]) -> Program:
        """The plan as fixed linear combinations (:func:`.stepper.compile_steps`)."""
        prediction = self._prediction

        def data(knot: Knot) -> tuple[float, float]:
            return data_coefficients(prediction, knot.alpha, knot.sigma)

        return compile_steps(steps, self._pinned, data, transform_x0=self._transforms_x0)

    # ------------------------------------------------------------------ stepping

    def index_for_timestep(
        self, timestep: float | Tensor, schedule_timesteps: Tensor | None = None
    ) -> int:
        """Position of ``timestep`` in ``timesteps``. A repeated value is resolved to the
        first occurrence that starts a step (a solver's intermediate point at a step's end
        time, as in Heun's layout, comes just before the next step's start)."""
        pool = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = timestep.to(pool.device) if isinstance(timestep, Tensor) else timestep
        hits = (pool == value).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"timestep {float(timestep)} is not one of the scheduler's timesteps")
        starts = set(itertools.accumulate((len(st.evals) for st in self._full_plan), initial=0))
        return int(next((h for h in hits if h in starts), hits[0]))

    def _start(self, position: int) -> CompiledStepper | ReplayingStepper:
        """The compiled run from evaluation ``position`` (the first timestep this run
        denoises): warm-up and the singlestep grouping restart there, as in diffusers.
        Solvers whose coefficients are per-dimension tensors are replayed instead."""
        if not self.solver.scalar_coefficients:
            prediction = self._prediction

            def data(knot: Knot) -> tuple[float, float]:
                return data_coefficients(prediction, knot.alpha, knot.sigma)

            steps = self._plan_from(position)
            return ReplayingStepper(steps, self._pinned, data, offset=position)
        if position not in self._compiled:
            self._compiled[position] = self._compile(self._plan_from(position))
        return CompiledStepper(self._compiled[position], offset=position)

    def _plan_from(self, position: int) -> list[DrivenStep]:
        if position >= len(self.timesteps):
            raise ValueError(
                f"begin_index={position} is past the last of {len(self.timesteps)} timesteps"
            )
        if self._layout != "solver":
            # Grid and multistep layouts evaluate once per interval: re-plan from there.
            return self._plan(position)
        first = 0
        for p, st in enumerate(self._full_plan):
            if first == position:
                return self._full_plan[p:]
            if first < position < first + len(st.evals):
                # A start inside a step (img2img with a solver-placed intermediate point):
                # first-order (DDIM) steps through the step's remaining evaluation points,
                # then the plan as it was.
                ddim = MultistepDPMSolver(order=1)
                rest = [*st.evals[position - first :], st.t]
                head = [DrivenStep(a, b, 1, ddim, (a,)) for a, b in itertools.pairwise(rest)]
                return head + self._full_plan[p + 1 :]
            first += len(st.evals)
        raise AssertionError("unreachable: position checked above")

    def _begin(self, timestep: float | Tensor) -> CompiledStepper | ReplayingStepper:
        if self._knots is None or self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        start = (
            self._begin_index
            if self._begin_index is not None
            else self.index_for_timestep(timestep)
        )
        self._stepper = self._start(start)
        self._step_index = start
        if self._tracks:
            rest = self._plan_from(start)
            base = len(self._full_plan) - len(rest)  # the plan position of the run's first step
            self._track_steps = [
                (base + i, st, j) for i, st in enumerate(rest) for j in range(len(st.evals))
            ]
            self._track_base, self._track_start = start, None
            self._end_step = FinalStep("extrapolate", self.solver) if self._extrapolate else None
            self._comp = None
            if self._compensation is not None and rest == self._full_plan[-len(rest) :]:
                # a run from any step of the plan: the ratios still count its steps
                self._comp = Compensation(self._compensation, len(self._full_plan))
            # the correction's principal directions need the run from its start
            self._corr = None
            if self._correction is not None and base != 0:
                warnings.warn(
                    "the profile's correction of the data predictions needs the run from the "
                    "plan's first step; this run starts later and goes without it",
                    stacklevel=3,
                )
        return self._stepper

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: torch.Generator | None = None,
        variance_noise: Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple[Tensor]:
        """Advance by one network evaluation.

        Args:
            model_output: the network output at ``timestep`` for ``sample``.
            timestep: the current entry of ``timesteps``.
            sample: the state the network was evaluated at (in the schedule's own space).
            generator: random generator for stochastic solvers.
            variance_noise: noise to use instead of drawing it (stochastic solvers).
            return_dict: return a ``SchedulerOutput`` (default) or a tuple.

        Returns:
            The state at the next timestep (an intermediate point of a singlestep step, or
            the step's end), in ``model_output``'s dtype. No autograd graph is kept unless
            the config sets ``differentiable``.
        """
        stepper = self._stepper
        if stepper is None:
            stepper = self._begin(timestep)
        self._generator, self._variance_noise = generator, variance_noise
        if torch.is_grad_enabled() and not self._cfg.differentiable:
            with torch.no_grad():
                prev = self._advance(stepper, model_output, sample)
        else:
            prev = self._advance(stepper, model_output, sample)
        self._generator = self._variance_noise = None
        self._step_index += 1  # type: ignore[operator]
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    def _advance(
        self, stepper: CompiledStepper | ReplayingStepper, model_output: Tensor, sample: Tensor
    ) -> Tensor:
        dtype = sample.dtype
        work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        x = sample if dtype == work else sample.to(work)
        out = model_output
        if self._learned_variance:
            out = out[:, : sample.shape[1]]  # the learned variance is not used by ODE solvers
        if out.dtype != work:
            out = out.to(work)
        transform = self._transform_x0 if self._transforms_x0 else None
        if self._tracks:
            prev = self._tracked_advance(stepper, x, out, transform)
        else:
            prev = stepper.advance(x, out, self._draw, transform)
        return prev if prev.dtype == model_output.dtype else prev.to(model_output.dtype)

    @property
    def _tracks(self) -> bool:
        """Whether steps' starts are kept (a profile's step limit, extrapolated end or
        compensation or correction)."""
        return (
            self._limit is not None
            or self._extrapolate
            or self._compensation is not None
            or self._correction is not None
        )

    def _tracked_advance(
        self,
        stepper: CompiledStepper | ReplayingStepper,
        x: Tensor,
        out: Tensor,
        transform: Callable[[Tensor, Knot], Tensor] | None,
    ) -> Tensor:
        """:meth:`_advance` with the profile's step limit or extrapolated step into sigma =
        0: the state and data prediction at each step's start are kept, the step's end is
        limited against them, and the step into sigma = 0 extrapolates the last two steps'
        data predictions, as :func:`dpmsolver.loop.solve` does."""
        assert transform is not None
        k = stepper.next_position - self._track_base
        if not 0 <= k < len(self._track_steps):  # past the plan: the stepper says so
            return stepper.advance(x, out, self._draw, transform)
        i, step, j = self._track_steps[k]
        seen: list[Tensor] = []
        comp = self._comp if j == 0 else None  # a step's start: where the loop compensates
        if j == 0 and i == 0 and self._correction is not None:
            # plan position 0: the run starts at the plan's start, from x_T
            self._corr = Correction(self._correction, len(self._full_plan), x)
        corr = self._corr if j == 0 else None

        def keep(x0: Tensor, knot: Knot) -> Tensor:
            x0 = transform(x0, knot)
            if comp is not None:
                x0 = comp(x0, i)
            if corr is not None:
                x0 = corr(x0, i)
            seen.append(x0)
            return x0

        prev = stepper.advance(x, out, self._draw, keep)
        if j == 0:
            self._track_start = (x, seen[0] if seen else None)
        if j == len(step.evals) - 1 and self._track_start is not None:
            x_s, x0_s = self._track_start
            self._track_start = None
            if x0_s is not None:
                if self._limit is not None:
                    prev = self._limit.apply(x_s, x0_s, prev, step.s, step.t, i)
                if self._end_step is not None:
                    if step.t.lam == math.inf:
                        prev = self._end_step.take(x_s, x0_s, step.s, step.t)
                    self._end_step.remember(x0_s, step.s)
        return prev

    @property
    def _transforms_x0(self) -> bool:
        """Whether data predictions are transformed (the program then materializes them)."""
        return self._threshold is not None or self._cap is not None or self._tracks

    def _transform_x0(self, x0: Tensor, knot: Knot) -> Tensor:
        """Thresholding, then a profile's norm cap, as :func:`dpmsolver.sample` orders them."""
        if self._threshold is not None:
            x0 = self._threshold.threshold(x0)
        if self._cap is not None:
            x0 = self._cap.bound(x0, knot.lam)
        return x0

    def _draw(self, like: Tensor, a: Knot, b: Knot) -> Tensor:
        """Noise for stochastic solvers: ``variance_noise`` once per step call, else drawn
        with ``generator``."""
        given = self._variance_noise
        if given is not None:
            self._variance_noise = None
            return given.to(device=like.device, dtype=like.dtype)
        return randn_tensor(
            like.shape, generator=self._generator, device=like.device, dtype=like.dtype
        )

    def scale_model_input(self, sample: Tensor, timestep: float | Tensor | None = None) -> Tensor:
        """The network takes the state as it is (VP latents / flow state): identity."""
        return sample

    # ------------------------------------------------------------------ forward process

    def _noise_knots(self, timesteps: Tensor) -> list[Knot]:
        if self._knots is not None and self._step_index is not None:
            return [self._evaluation_knot(self._step_index)] * timesteps.numel()
        if self._knots is not None and self._begin_index is not None:
            return [self._evaluation_knot(self._begin_index)] * timesteps.numel()
        out = []
        for t in timesteps.flatten().tolist():
            hit = (
                (self.timesteps.cpu() == t).nonzero().flatten().tolist()
                if self._knots is not None
                else []
            )
            if hit:
                out.append(self._evaluation_knot(hit[1] if len(hit) > 1 else hit[0]))
            elif self._flow is not None:
                out.append(self._flow.knot(float(t) / self._cfg.num_train_timesteps))
            elif self._continuous:
                out.append(self.schedule.knot_at_lambda(-4.0 * float(t)))
            else:
                out.append(self.schedule.knot(self.schedule.check_time("timesteps", float(t))))
        return out

    def _evaluation_knot(self, position: int) -> Knot:
        assert self._knots is not None
        evals = [k for st in self._full_plan for k in st.evals]
        return evals[position] if position < len(evals) else self._knots[-1]

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process ``alpha_t x0 + sigma_t noise`` at ``timesteps`` (the grid's
        noise level at the begin index when the pipeline set one, as diffusers does)."""
        knots = self._noise_knots(torch.as_tensor(timesteps).reshape(-1))
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        kw = {"dtype": original_samples.dtype, "device": original_samples.device}
        alpha = torch.tensor([k.alpha for k in knots], **kw).view(shape)  # type: ignore[arg-type]
        sigma = torch.tensor([k.sigma for k in knots], **kw).view(shape)  # type: ignore[arg-type]
        return alpha * original_samples + sigma * noise

    def scale_noise(
        self, sample: Tensor, timestep: float | Tensor, noise: Tensor | None = None
    ) -> Tensor:
        """``FlowMatchEulerDiscreteScheduler``'s name for :meth:`add_noise` (flow img2img)."""
        if noise is None:
            raise ValueError("scale_noise needs noise")
        return self.add_noise(sample, noise, torch.as_tensor(timestep).reshape(-1))


class DPMSolverInverseScheduler(DPMSolverScheduler):
    """The same solvers run from data to noise (DDIM inversion generalised; DPM-Solver's
    updates hold for negative steps in lambda). ``set_timesteps`` builds the sampling grid
    ending at ``sigma_min`` and reverses it: the first timestep is the least noisy training
    level, where the data is taken as the state, and the last step reaches the noisiest
    level (or, for flow matching, pure noise via ``x = eps_hat``). Sampling the result with
    ``DPMSolverScheduler`` and ``final_sigmas_type="sigma_min"`` on the same grid returns
    the data up to the solver's error. ``solver="auto"`` picks its solver for the budget
    and runs it on this grid."""

    def _final(self) -> dg.FinalSigma:
        return "sigma_min"

    def _orient(self, knots: list[Knot]) -> list[Knot]:
        return knots[::-1]

    def _own_grid_allowed(self) -> bool:
        return False


def _load_profile(profile: Any) -> Profile | None:
    """``profile=`` as a :class:`~dpmsolver.tune.Profile` (from a path or JSON data)."""
    from ..tune import Profile

    if profile is None or isinstance(profile, Profile):
        return profile
    if isinstance(profile, (str, os.PathLike)):
        return Profile.load(os.fspath(profile))
    if isinstance(profile, Mapping):
        return Profile.from_json(profile, "profile=")
    raise TypeError(
        f"profile= must be a dpmsolver Profile, a path to one or its JSON data, not "
        f"{type(profile).__name__}"
    )
