"""A diffusers scheduler driven by dpmsolver's solvers.

``pipe.scheduler = DPMSolverScheduler.from_config(pipe.scheduler.config, solver="dpmpp_2m")``
swaps any Stable-Diffusion-style (eps / v, zero-terminal-SNR) or flow-matching pipeline onto
any registered solver. The scheduler is a thin adapter: it builds the time grid the way
diffusers does (:mod:`.diffusers_grid`), converts each network output to a data prediction
with :func:`dpmsolver.parameterization.to_data`, applies dynamic thresholding
(:class:`dpmsolver.guidance.DynamicThresholding`), and advances with the solver's own
``step`` through :class:`.stepper.OneEvaluationStepper`. Singlestep solvers get their
intermediate points listed in ``timesteps`` (diffusers calls the network once per timestep)
and are replayed exactly; see :mod:`.stepper`.

Requires diffusers (``pip install diffusers``); nothing else in dpmsolver does.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

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

from .._validate import check_choice, check_int
from ..guidance import DynamicThresholding
from ..parameterization import Prediction, to_data
from ..plan import lower_order_final_default, solver_orders
from ..schedules import DiscreteVPSchedule, Knot, NoiseSchedule, RectifiedFlowSchedule
from ..solvers import (
    ALIASES,
    REGISTRY,
    AdaptiveSolver,
    FastDPMSolver,
    MultistepSolver,
    Solver,
    get_solver,
)
from . import diffusers_grid as dg
from .stepper import (
    DrivenStep,
    OneEvaluationStepper,
    PinnedSchedule,
    grouped_plan,
    probed_plan,
    supports_fractions,
)

__all__ = ["PEER_SOLVERS", "PREDICTION_TYPES", "DPMSolverInverseScheduler", "DPMSolverScheduler"]

PREDICTION_TYPES: dict[str, Prediction] = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "flow_prediction": "flow",
}

# Which solver a diffusers config asks for, when ``from_config`` is not told one:
# (scheduler class, algorithm_type) -> registry name or alias. Other configs (PNDM, Euler,
# flow matching, ...) describe a noise schedule only and get the default solver. Entries
# whose solver is not registered make ``from_config`` ask for an explicit ``solver=``.
PEER_SOLVERS: dict[tuple[str, str], str] = {
    ("DPMSolverMultistepScheduler", "dpmsolver++"): "dpmpp_multistep",
    ("DPMSolverMultistepScheduler", "dpmsolver"): "dpm_multistep",
    ("DPMSolverMultistepScheduler", "sde-dpmsolver++"): "dpmpp_2m_sde",
    ("DPMSolverMultistepInverseScheduler", "dpmsolver++"): "dpmpp_multistep",
    ("DPMSolverMultistepInverseScheduler", "dpmsolver"): "dpm_multistep",
    ("DPMSolverSinglestepScheduler", "dpmsolver++"): "dpmpp_singlestep",
    ("DPMSolverSinglestepScheduler", "dpmsolver"): "dpm_singlestep",
    ("DPMSolverSinglestepScheduler", "sde-dpmsolver++"): "dpmpp_sde",
}

# diffusers' ``solver_type`` names the second-order update; the DPM-Solver family calls it
# ``variant``. diffusers' DPM schedulers read other algorithms' names (UniPC's "bh1"/"bh2",
# DEIS' "logrho") as "midpoint", and so does this scheduler for the DPM-Solver family.
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


def _source_class(cfg: Mapping[str, Any]) -> str:
    """The diffusers scheduler a config came from: its ``_class_name`` (configs loaded from
    disk carry it), else recognised by its keys (in-memory configs of schedulers built in
    code do not)."""
    if "_class_name" in cfg:
        return str(cfg["_class_name"])
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


def _no_denoiser(x: Tensor, knot: Knot) -> Tensor:
    raise RuntimeError("the scheduler thresholds data predictions it is given; it never denoises")


class DPMSolverScheduler(SchedulerMixin, ConfigMixin):  # type: ignore[misc]
    """A diffusers scheduler running any registered dpmsolver solver.

    Configuration (every key is saved by ``save_pretrained``; the diffusers keys mean what
    they mean in ``DPMSolverMultistepScheduler`` / ``FlowMatchEulerDiscreteScheduler``):

    Args:
        solver: registry name or alias (default ``"dpmpp_multistep"``; e.g. ``"dpmpp_2m"``,
            ``"dpmpp_3m"``, ``"dpmpp_2s"``, ``"dpm_fast"``; see ``dpmsolver.solvers``).
            Adaptive solvers choose their own steps and cannot be driven by a fixed list of
            timesteps.
        solver_order: the solver's order (default: the solver's default).
        solver_options: extra solver options, e.g. ``{"third_order": "legacy"}``.
        solver_type: diffusers' name for the second-order update, ``"midpoint"`` (default)
            or ``"heun"``; the DPM-Solver family's ``variant`` unless ``solver_options`` sets it.
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
            the data prediction (Imagen, Sec. 2.3; defaults False, 0.995, 1.0).
        timestep_spacing: ``"linspace"`` (default), ``"leading"`` or ``"trailing"``.
        steps_offset: offset of ``"leading"`` timesteps (default 0).
        use_karras_sigmas, use_exponential_sigmas, use_lu_lambdas: Karras, exponential or
            log-SNR-uniform noise levels instead of spaced timesteps (at most one; default
            all False). ``use_beta_sigmas`` is not supported (must be False).
        final_sigmas_type: ``"zero"`` (default: the last step goes to sigma = 0) or
            ``"sigma_min"`` (stop at the least noisy training level).
        lambda_min_clipped: skip timesteps whose half log-SNR is below this (default -inf).
        lower_order_final: lower the order of the last steps (multistep: only below 15
            steps, as diffusers; default True). euler_at_final: last step first order.
        use_flow_sigmas, flow_shift: ``DPMSolverMultistepScheduler``'s flow-matching grid.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, time_shift_type, shift_terminal:
            ``FlowMatchEulerDiscreteScheduler``'s flow-matching grid (pipelines read the
            ``*_seq_len`` / ``*_shift`` keys to compute ``mu``). ``invert_sigmas`` and
            ``stochastic_sampling`` must be False.
    """

    _compatibles = _COMPATIBLES
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        solver: str = "dpmpp_multistep",
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
    ) -> None:
        check_choice("prediction_type", prediction_type, tuple(PREDICTION_TYPES))
        check_choice("variance_type", variance_type, (None, *_FIXED_VARIANCES, *_LEARNED_VARIANCES))
        check_choice("timestep_spacing", timestep_spacing, dg.TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        check_choice("singlestep_layout", singlestep_layout, (None, "grid", "solver"))
        for name, value in (
            ("use_beta_sigmas", use_beta_sigmas),
            ("invert_sigmas", invert_sigmas),
            ("stochastic_sampling", stochastic_sampling),
        ):
            check_choice(name, value, (False,))
        spacings = [
            n
            for n, on in (
                ("use_karras_sigmas", use_karras_sigmas),
                ("use_exponential_sigmas", use_exponential_sigmas),
                ("use_lu_lambdas", use_lu_lambdas),
            )
            if on
        ]
        if len(spacings) > 1:
            raise ValueError(
                f"{' and '.join(spacings)} are all set; set at most one of use_karras_sigmas, "
                "use_exponential_sigmas, use_lu_lambdas"
            )
        self._sigma_spacing: dg.SigmaSpacing = {
            "use_karras_sigmas": "karras",
            "use_exponential_sigmas": "exponential",
            "use_lu_lambdas": "logsnr",
        }.get(spacings[0] if spacings else "", "timesteps")  # type: ignore[assignment]
        check_int("num_train_timesteps", num_train_timesteps, minimum=2)

        self.solver: Solver = self._build_solver(solver, solver_order, solver_options, solver_type)
        if isinstance(self.solver, AdaptiveSolver):
            raise ValueError(
                f"solver={solver!r} is adaptive: it chooses its own steps, which a pipeline's "
                "fixed list of timesteps cannot follow; choose a multistep or singlestep solver"
            )
        self._layout = self._resolve_layout(singlestep_layout)
        # Record the order actually used, so the saved config also loads into diffusers'
        # DPMSolver schedulers (which need an integer solver_order).
        self.register_to_config(solver_order=self.solver.order)
        self._prediction: Prediction = PREDICTION_TYPES[prediction_type]
        self._threshold = (
            DynamicThresholding(_no_denoiser, dynamic_thresholding_ratio, sample_max_value)
            if thresholding
            else None
        )

        self.is_flow = prediction_type == "flow_prediction"
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

        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self.sigmas = torch.zeros(0)
        self._knots: list[Knot] | None = None
        self._full_plan: list[DrivenStep] = []
        self._pinned: NoiseSchedule = self.schedule
        self._stepper: OneEvaluationStepper | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | None = None,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Build from any compatible diffusers config (``ConfigMixin.from_config``).

        A DPM-Solver config chooses the matching solver unless ``solver`` is given
        (:data:`PEER_SOLVERS`); a ``FlowMatch*`` config means ``prediction_type="flow_prediction"``.
        An explicitly chosen alias that fixes the order (``"dpmpp_2m"``) overrides the
        config's ``solver_order``.
        """
        if config is None:
            raise ValueError("from_config needs a config (e.g. pipe.scheduler.config)")
        cfg = dict(config)
        source = _source_class(cfg)
        # diffusers lists the keys a scheduler left at its defaults, and from_config drops
        # them so that the new class applies its own (SD v1's PNDM config thus gives
        # DPMSolver's "linspace" spacing, not PNDM's "leading"); so does this scheduler.
        # A DPM-Solver config is translated to the same algorithm, so there its values
        # are the behaviour to keep (DPMSolverSinglestepScheduler's lower_order_final=False).
        if any(source == peer for peer, _ in PEER_SOLVERS):
            cfg.pop("_use_default_values", None)
        if "solver" not in kwargs and "solver" not in cfg:
            key = (source, str(cfg.get("algorithm_type", "dpmsolver++")))
            if key in PEER_SOLVERS:
                name = PEER_SOLVERS[key]
                if name not in REGISTRY and name not in ALIASES:
                    raise ValueError(
                        f"a {source} config with algorithm_type={key[1]!r} asks for solver "
                        f"{name!r}, which is not registered; pass solver=... explicitly "
                        f"(registered: {', '.join(sorted(REGISTRY))})"
                    )
                kwargs["solver"] = name
        if "solver" in kwargs and "solver_order" not in kwargs and _fixes_order(kwargs["solver"]):
            cfg.pop("solver_order", None)
        if source.startswith("FlowMatch") and "prediction_type" not in kwargs:
            kwargs["prediction_type"] = "flow_prediction"
        return super().from_config(cfg, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @staticmethod
    def _build_solver(
        name: str, order: int | None, options: Mapping[str, Any] | None, solver_type: str | None
    ) -> Solver:
        opts = dict(options or {})
        registered = _base_name(name)
        if (
            solver_type is not None
            and registered in REGISTRY
            and "variant" in REGISTRY[registered].options
        ):
            if registered.startswith("dpm"):
                check_choice("solver_type", solver_type, tuple(_DPM_SOLVER_TYPES))
                opts.setdefault("variant", _DPM_SOLVER_TYPES[solver_type])
            else:
                opts.setdefault("variant", solver_type)
        return get_solver(name, order, **opts)

    def _resolve_layout(self, layout: str | None) -> str:
        if isinstance(self.solver, MultistepSolver):
            return "multistep"
        if layout is None:
            return "grid" if supports_fractions(self.solver) else "solver"
        if layout == "grid" and not supports_fractions(self.solver):
            raise ValueError(
                f"singlestep_layout='grid' needs a solver whose intermediate points are options "
                f"r1/r2; {type(self.solver).__name__} places its own: use "
                "singlestep_layout='solver'"
            )
        return layout

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

    def _flow_sigma_min(self) -> float:
        n_train = self._cfg.num_train_timesteps
        v = 1.0 / n_train
        if self._cfg.use_dynamic_shifting:
            return v
        s = self._cfg.shift
        return s * v / (1 + (s - 1) * v)

    def _grid(
        self,
        n: int | None,
        timesteps: Sequence[float] | None,
        sigmas: Sequence[float] | None,
        mu: float | None,
    ) -> list[Knot]:
        cfg, final = self._cfg, self._final()
        if timesteps is not None:
            vals = [
                float(v) for v in torch.as_tensor(timesteps, dtype=torch.float64).flatten().tolist()
            ]
            if self._flow is not None:
                # Custom flow timesteps are the network times; their levels are t / N (unshifted).
                knots = dg.flow_knots(
                    self._flow,
                    [v / cfg.num_train_timesteps for v in vals],
                    num_train_timesteps=cfg.num_train_timesteps,
                    final=final,
                    sigma_min=self._flow_sigma_min(),
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
            levels: Sequence[float] | np.ndarray
            if cfg.use_flow_sigmas:
                shift = (
                    math.exp(mu)
                    if (cfg.use_dynamic_shifting and mu is not None)
                    else cfg.flow_shift
                )
                assert n is not None
                levels = dg.dpm_flow_sigmas(n, cfg.num_train_timesteps, shift)
                truncate = True
            else:
                levels = dg.flowmatch_sigmas(
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
                levels,
                num_train_timesteps=cfg.num_train_timesteps,
                truncate=truncate,
                final=final,
                sigma_min=self._flow_sigma_min(),
            )
        assert isinstance(self.schedule, DiscreteVPSchedule)
        if sigmas is not None:
            vals = [
                float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
            ]
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
            truncate=cfg.beta_schedule == "squaredcos_cap_v2",
            final=final,
        )

    def _vp_final(self, final: str) -> Knot:
        return self.schedule.zero_knot() if final == "zero" else self.schedule.knot(0.0)

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
            raise ValueError(
                "the timesteps / sigmas must be strictly monotone in noise level (no repeats, "
                "no reversals); got half log-SNRs " + ", ".join(f"{v:.4g}" for v in lams)
            )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
    ) -> None:
        """Build the grid (run before the loop).

        Args:
            num_inference_steps: number of grid steps; with ``singlestep_layout="grid"``
                this is the number of network evaluations (as diffusers' singlestep).
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
            and not self._cfg.use_flow_sigmas
        ):
            raise ValueError(
                "use_dynamic_shifting=True needs mu in set_timesteps (as Flux / SD3 pass it)"
            )
        knots = self._orient(self._grid(num_inference_steps, timesteps, sigmas, mu))
        self._check_monotone(knots)
        self._knots = knots
        self._pinned = PinnedSchedule(self.schedule, knots)
        self._full_plan = self._plan(0)
        evals = [k for st in self._full_plan for k in st.evals]
        times = [k.model_t for k in evals]
        integral = not self.is_flow and all(float(v).is_integer() for v in times)
        self.timesteps = torch.tensor(
            times, dtype=torch.int64 if integral else torch.float32, device=device
        )
        levels = [self._level(k) for k in [*evals, knots[-1]]]
        self.sigmas = torch.tensor(levels, dtype=torch.float32)
        self.num_inference_steps = len(times)
        self.order = self._evaluations_per_step()
        self._stepper, self._step_index, self._begin_index = None, None, None

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
        # diffusers lowers the final orders of multistep solvers only below 15 steps.
        lof = bool(self._cfg.lower_order_final)
        if self._layout == "grid":
            return grouped_plan(self.solver, knots, self._groups(knots, lof, final_zero))
        steps_lof = lof and lower_order_final_default(len(self._knots) - 1)
        orders = solver_orders(
            self.solver, steps=n, final_zero=final_zero, lower_order_final=steps_lof
        )
        if self._cfg.euler_at_final:
            orders[-1] = 1
        return probed_plan(self.solver, knots, orders, self._pinned)

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

    def _start(self, position: int) -> OneEvaluationStepper:
        """Plan from evaluation ``position`` (the first timestep this run denoises)."""
        if position == 0:
            return OneEvaluationStepper(self._full_plan, self._pinned)
        if self._layout != "solver":
            # Grid and multistep layouts evaluate once per interval: re-plan from there so
            # warm-up and the singlestep grouping start where sampling does.
            return OneEvaluationStepper(self._plan(position), self._pinned, offset=position)
        first = 0
        for p, st in enumerate(self._full_plan):
            if first == position:
                return OneEvaluationStepper(self._full_plan[p:], self._pinned, offset=position)
            first += len(st.evals)
        raise ValueError(
            f"timestep index {position} is an intermediate point of a singlestep step; "
            "sampling must start at a step's first timestep"
        )

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
            the step's end), in ``model_output``'s dtype.
        """
        if self._knots is None or self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._stepper is None or self._step_index is None:
            start = (
                self._begin_index
                if self._begin_index is not None
                else self.index_for_timestep(timestep)
            )
            self._stepper = self._start(start)
            self._step_index = start
        st, j = self._stepper.locate(self._step_index)
        knot = st.evals[j]
        work = torch.promote_types(sample.dtype, torch.float32)
        x = sample.to(work)
        out = model_output
        if self._cfg.variance_type in _LEARNED_VARIANCES:
            out = out[:, : sample.shape[1]]  # the learned variance is not used by ODE solvers
        x0 = to_data(out.to(work), x, knot.alpha, knot.sigma, self._prediction)
        if self._threshold is not None:
            x0 = self._threshold.threshold(x0)
        fresh = [variance_noise]

        def draw(like: Tensor, a: Knot, b: Knot) -> Tensor:
            given = fresh.pop() if fresh else None
            if given is not None:
                return given.to(device=like.device, dtype=like.dtype)
            return randn_tensor(
                like.shape, generator=generator, device=like.device, dtype=like.dtype
            )

        prev = self._stepper.advance(x0, x, draw).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

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
    the data up to the solver's error."""

    def _final(self) -> dg.FinalSigma:
        return "sigma_min"

    def _orient(self, knots: list[Knot]) -> list[Knot]:
        return knots[::-1]
