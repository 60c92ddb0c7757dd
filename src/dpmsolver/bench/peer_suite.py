"""Peer samplers (diffusers, k-diffusion) on every suite problem, side by side with ours.

:func:`run_peers` runs every peer configuration that applies to a problem's schedule family
at an exact NFE budget, from a given start state with a given guided denoiser, and returns
each final sample with the network evaluations actually made (a configuration that cannot
spend exactly the budget is skipped; one that spent a different number is rejected). The
configurations are one table, :func:`peer_configs` (printed by :func:`config_table`).

How each peer sees a problem (every conversion is exact; only the peers' own arithmetic,
float32 in parts of diffusers, and their grids differ from the ODE):

- *k-diffusion* samplers run on ``x~ = x / alpha`` at ``sigma~ = sigma / alpha`` (every
  schedule is a VE schedule there), with the exact denoiser at the knot of that
  ``sigma~``. Rectified flow starts at ``alpha = 0`` where ``x~`` is infinite: these runs
  spend their first evaluation on the first-order step out of pure noise (flow Euler =
  DDIM) to the first finite knot (``sigma~ = 80``, EDM's ``sigma_max``, for the Karras and
  exponential grids). On flow problems the samplers also run as ComfyUI runs them on flow
  models ("flow-sigma" rows): on ``x`` itself with ``sigma`` the flow time, whose ODE
  ``dx/ds = (x - D) / s`` is the flow ODE exactly, from ``s = 1``. k-diffusion 0.1.1 has
  no deis, ipndm, ipndm_v or uni_pc samplers (those are in ComfyUI's fork); its
  ``dpmpp_sde`` with ``eta = 0`` is ``dpmpp_2s_ancestral`` with ``eta = 0``, and
  ``dpmpp_2m_sde`` with ``eta = 0`` and the midpoint form is ``dpmpp_2m``, so those are
  not repeated.
- *diffusers' DDPM schedulers* step with the exact noise prediction at the scheduler's own
  timesteps: on Stable Diffusion's discrete schedule natively; on continuous VP and VE
  problems through a 1000-step proxy DDPM schedule (``trained_betas``) whose knots are the
  problem's own (uniform in ``t`` for VP, uniform in log-SNR for VE), the "network"
  mapping a (possibly fractional) timestep to its log-SNR by the scheduler's own
  ``alphas_cumprod`` and evaluating the exact denoiser there. Schedulers that round
  Karras / log-SNR timesteps to integers keep that rounding, as with SD.
- *diffusers' EDM schedulers* run on ``x~`` at ``sigma~`` (the problem's range), with the
  network output that their preconditioning maps to the exact data prediction.
- *diffusers' flow schedulers* (FlowMatchEuler/Heun, and the multistep schedulers with
  ``use_flow_sigmas``) run on flow problems with the exact velocity ``(x - D) / s`` at
  ``s = timestep / 1000``, with the problem's shift, as a pipeline calls the network. The
  multistep schedulers' timesteps are integers, so there the network's noise level sits up
  to 1/1000 below the one the scheduler steps with (:mod:`.flow_timesteps` measures what
  that does).

Peer packages are optional: configurations whose package is missing are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .._validate import check_choice
from ..denoiser import Denoiser
from ..schedules import DiscreteVPSchedule, Knot, RectifiedFlowSchedule
from .peers import diffusers_class, load_kdiffusion_sampling, run_scheduler
from .problem import Family, Problem

__all__ = [
    "ModelTime",
    "PeerConfig",
    "PeerResult",
    "PeerTask",
    "config_table",
    "peer_configs",
    "run_peer",
    "run_peers",
]

ALL: tuple[Family, ...] = ("discrete", "vp", "ve", "flow")
DDPM: tuple[Family, ...] = ("discrete", "vp", "ve")

#: k-diffusion's sigma~ at which runs on rectified flow enter the Karras / exponential grid
#: after the step out of pure noise (EDM's sigma_max).
FLOW_KSIGMA_MAX = 80.0


class PeerTask:
    """One problem, guided denoiser and start state, with an evaluation counter.

    Args:
        problem: the suite problem (its schedule and family).
        denoiser: ``x0_hat = D(x, knot)``.
        x_T: the start state at ``t_max``.
    """

    def __init__(self, problem: Problem, denoiser: Denoiser, x_T: Tensor) -> None:
        self.problem = problem
        self.schedule = problem.schedule
        self.family = problem.family
        self.denoiser = denoiser
        self.x_T = x_T
        self.calls = 0
        self.start = self.schedule.knot(self.schedule.t_max)
        self.end = self.schedule.knot(self.schedule.t_min)
        self._proxy: dict[str, Any] = {}

    def D(self, x: Tensor, knot: Knot) -> Tensor:
        """The denoiser, counted."""
        self.calls += 1
        return self.denoiser(x, knot)

    def knot_ksigma(self, ksigma: float) -> Knot:
        """The problem's knot at k-diffusion's ``sigma~`` (pure noise at ``inf``)."""
        if math.isinf(ksigma):
            return self.start
        return self.schedule.knot_at_lambda(-math.log(ksigma))

    def knot_flow_sigma(self, s: float) -> Knot:
        """The problem's knot at the flow noise level ``s`` (``alpha = 1 - s``)."""
        if s >= 1.0:
            return self.start
        return self.schedule.knot_at_lambda(math.log((1.0 - s) / s))

    @property
    def shift(self) -> float:
        """The rectified-flow shift (1 for other schedules)."""
        return float(getattr(self.schedule, "shift", 1.0))


@dataclass(frozen=True)
class PeerConfig:
    """One peer configuration.

    Attributes:
        label: short name for tables.
        source: ``"diffusers"`` or ``"k-diffusion"``.
        families: the schedule families it applies to.
        run: ``run(task, nfe)`` -> final sample, or None if it cannot spend exactly ``nfe``.
    """

    label: str
    source: str
    families: tuple[Family, ...]
    run: Callable[[PeerTask, int], Tensor | None]


@dataclass(frozen=True)
class PeerResult:
    """A configuration's outcome: the final sample (None when skipped) and the network
    evaluations it made."""

    label: str
    source: str
    sample: Tensor | None
    nfe: int


# --------------------------------------------------------------------------------------
# k-diffusion
# --------------------------------------------------------------------------------------

KSigmas = Literal["karras", "exponential", "own"]


def _per_step_count(per_step: int, budget: int) -> int | None:
    """Noisy knots ``n`` so that a sampler spending ``per_step`` evaluations per step (one
    on the final step to 0) spends ``budget``."""
    if per_step == 1:
        return budget if budget >= 1 else None
    if budget % 2 == 1 and budget >= 1:
        return (budget + 1) // 2
    return None


def _ksigmas(task: PeerTask, kind: KSigmas, n: int, flow_mode: bool, exit_step: bool) -> Tensor:
    """``n`` noisy k-diffusion sigmas and a trailing 0 (float64)."""
    k = load_kdiffusion_sampling()
    sched = task.schedule
    if flow_mode:
        assert isinstance(sched, RectifiedFlowSchedule)
        smin, smax = float(sched.shifted(torch.tensor(sched.t_min))), 1.0
        if kind == "own":
            t = torch.linspace(sched.t_max, sched.t_min, n, dtype=torch.float64)
            return torch.cat([sched.shifted(t), t.new_zeros(1)])
    else:
        smin = task.end.ksigma
        smax = FLOW_KSIGMA_MAX if exit_step else task.start.ksigma
        if kind == "own":
            # the schedule's time-uniform grid; from pure noise its first knot is the exit
            m = n + 1 if exit_step else n
            ts = torch.linspace(sched.t_max, sched.t_min, m, dtype=torch.float64).tolist()
            sig = [sched.knot(t).ksigma for t in ts][1 if exit_step else 0 :]
            return torch.tensor([*sig, 0.0], dtype=torch.float64)
    fn = k.get_sigmas_karras if kind == "karras" else k.get_sigmas_exponential
    return fn(n, smin, smax).double()


def _kdiff(
    fn: str,
    label: str,
    sigmas: KSigmas,
    per_step: int,
    *,
    flow_mode: bool = False,
    families: tuple[Family, ...] | None = None,
    **kwargs: Any,
) -> PeerConfig | None:
    if load_kdiffusion_sampling() is None:
        return None
    if families is None:
        families = (
            ("flow",) if flow_mode else (("discrete", "vp", "flow") if sigmas == "own" else ALL)
        )

    def run(task: PeerTask, nfe: int) -> Tensor | None:
        k = load_kdiffusion_sampling()
        exit_step = task.family == "flow" and not flow_mode
        n = _per_step_count(per_step, nfe - (1 if exit_step else 0))
        if n is None:
            return None
        sig = _ksigmas(task, sigmas, n, flow_mode, exit_step).to(task.x_T.device)
        x = _start_k(task, float(sig[0]), exit_step, flow_mode)
        model = _flow_model(task) if flow_mode else _k_model(task)
        extra = dict(kwargs)
        if fn in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
            extra["noise_sampler"] = _no_noise  # eta = 0: never called; skips a Brownian tree
        return getattr(k, fn)(model, x, sig, disable=True, **extra)

    return PeerConfig(label, "k-diffusion", families, run)


def _no_noise(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    raise AssertionError("a deterministic configuration asked for noise")


def _k_model(task: PeerTask) -> Callable[..., Tensor]:
    """k-diffusion's ``model(x~, sigma~) -> x0``."""

    def model(xk: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        kn = task.knot_ksigma(float(sigma.flatten()[0]))
        return task.D(xk * kn.alpha, kn)

    return model


def _flow_model(task: PeerTask) -> Callable[..., Tensor]:
    """``model(x, s) -> x0`` with ``s`` the flow noise level (ComfyUI's flow models)."""

    def model(x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        return task.D(x, task.knot_flow_sigma(float(sigma.flatten()[0])))

    return model


def _start_k(task: PeerTask, first: float, exit_step: bool, flow_mode: bool) -> Tensor:
    """The state a k-diffusion sampler starts from: ``x_T`` (flow-sigma mode), ``x_T /
    alpha_T``, or after the step out of pure noise to ``sigma~ = first``."""
    if flow_mode:
        return task.x_T
    if not exit_step:
        return task.x_T / task.start.alpha
    s, t = task.start, task.knot_ksigma(first)
    x0 = task.D(task.x_T, s)
    # first-order (DDIM / flow Euler) step from alpha = 0: x_t = (sigma_t/sigma_s) x_s + alpha_t x0
    x = (t.sigma / s.sigma) * task.x_T + t.alpha * x0
    return x / t.alpha


def _kdiff_fast(label: str, *, flow_mode: bool = False) -> PeerConfig | None:
    """DPM-Solver-fast (k-diffusion, log-SNR steps of orders 3...3,2,1) on ``nfe - 1``
    evaluations plus the data prediction at sigma_min (DPM-Solver's ``denoise_to_zero``)."""
    if load_kdiffusion_sampling() is None:
        return None

    def run(task: PeerTask, nfe: int) -> Tensor | None:
        k = load_kdiffusion_sampling()
        exit_step = task.family == "flow" and not flow_mode
        budget = nfe - 1 - (1 if exit_step else 0)
        if budget < 1:
            return None
        if flow_mode:
            assert isinstance(task.schedule, RectifiedFlowSchedule)
            smin = float(task.schedule.shifted(torch.tensor(task.schedule.t_min)))
            smax = 1.0
            model = _flow_model(task)
        else:
            smin = task.end.ksigma
            smax = FLOW_KSIGMA_MAX if exit_step else task.start.ksigma
            model = _k_model(task)
        x = _start_k(task, smax, exit_step, flow_mode)
        x = k.sample_dpm_fast(model, x, smin, smax, budget, disable=True)
        s_in = x.new_ones(x.shape[0])
        return model(x, smin * s_in)

    return PeerConfig(label, "k-diffusion", ("flow",) if flow_mode else ALL, run)


# --------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------


def _steps_for(make: Callable[[], Any], nfe: int, cache: dict[int, int | None]) -> Any:
    """A fresh scheduler whose ``timesteps`` (one network call each) number exactly
    ``nfe``, or None. A scheduler spends about one or two calls per step, one more or less
    at the ends, so only those step counts are tried; the count found is kept in ``cache``
    (it depends on the configuration and ``nfe`` only)."""

    def hits(sched: Any, steps: int) -> bool:
        try:
            sched.set_timesteps(steps)
        except (ValueError, IndexError, RuntimeError, ZeroDivisionError):
            return False
        return len(sched.timesteps) == nfe

    if nfe not in cache:
        probe = make()
        candidates = [nfe, nfe - 1, nfe + 1, (nfe + 1) // 2, nfe // 2, (nfe - 1) // 2]
        cache[nfe] = next((s for s in dict.fromkeys(candidates) if s >= 1 and hits(probe, s)), None)
    steps = cache[nfe]
    if steps is None:
        return None
    sched = make()
    return sched if hits(sched, steps) else None


def _proxy_betas(task: PeerTask) -> Tensor:
    """``trained_betas`` of the problem's own DDPM schedule, or of a 1000-step proxy whose
    knots are the problem's (uniform in t for continuous VP, in log-SNR for VE)."""
    if "betas" not in task._proxy:
        sched = task.schedule
        if isinstance(sched, DiscreteVPSchedule):
            acp = sched.alphas_cumprod
        else:
            if task.family == "vp":
                ts = torch.linspace(sched.t_min, sched.t_max, 1000, dtype=torch.float64)
                lam = sched.lambda_(ts)
            else:
                lam = torch.linspace(task.end.lam, task.start.lam, 1000, dtype=torch.float64)
            acp = torch.sigmoid(2.0 * lam)
        prev = torch.cat([acp.new_ones(1), acp[:-1]])
        task._proxy["betas"] = 1.0 - acp / prev
    betas: Tensor = task._proxy["betas"]
    return betas


def _eps_network(task: PeerTask, sched: Any) -> Callable[[Tensor, Any], Tensor]:
    """The exact noise prediction at a diffusers timestep: its log-SNR is read from the
    scheduler's own ``alphas_cumprod`` (interpolated as diffusers and k-diffusion do)."""
    key = "table"
    if key not in task._proxy:
        task._proxy[key] = DiscreteVPSchedule(alphas_cumprod=sched.alphas_cumprod.double().cpu())
    table: DiscreteVPSchedule = task._proxy[key]

    def eps(x: Tensor, t: Any) -> Tensor:
        lam = float(table.lambda_(torch.tensor(float(t), dtype=torch.float64)))
        kn = task.schedule.knot_at_lambda(lam)
        a = 1.0 / math.sqrt(1.0 + math.exp(-2.0 * lam))  # VP alpha at lam
        s = 1.0 / math.sqrt(1.0 + math.exp(2.0 * lam))
        x0 = task.D(x * (kn.alpha / a), kn)
        return (x - a * x0) / s

    return eps


def _starts_at_t_max(sched: Any, n: int) -> bool:
    """Whether a DDPM scheduler's first step starts at the last training time: by its
    sigmas where it steps in them (Karras / exponential timesteps are rounded, the sigmas
    are not), else by its first timestep."""
    acp = sched.alphas_cumprod.double()
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None and len(sigmas) > 0:
        want = float(((1 - acp[-1]) / acp[-1]).sqrt())
        return abs(float(sigmas[0]) / want - 1.0) < 1e-4
    return abs(float(sched.timesteps[0]) - (n - 1)) < 0.5


def _ddpm(cls_name: str, label: str, **config: Any) -> PeerConfig | None:
    cls = diffusers_class(cls_name)
    if cls is None:
        return None

    steps_cache: dict[int, int | None] = {}

    def run(task: PeerTask, nfe: int) -> Tensor | None:
        betas = _proxy_betas(task).float().numpy()

        def make() -> Any:
            return cls(num_train_timesteps=len(betas), trained_betas=betas, **config)

        sched = _steps_for(make, nfe, steps_cache)
        if sched is None or not _starts_at_t_max(sched, len(betas)):
            return None  # cannot spend nfe, or does not start at t_max
        eps = _eps_network(task, sched)
        # x-space schedulers start from x_T; sigma~-space ones (Euler, Heun, LMS) from x_T/alpha
        table: DiscreteVPSchedule = task._proxy["table"]
        lam0 = float(table.lambda_(torch.tensor(float(len(betas) - 1), dtype=torch.float64)))
        a0 = 1.0 / math.sqrt(1.0 + math.exp(-2.0 * lam0))
        sample = task.x_T * (a0 / task.start.alpha)
        if float(getattr(sched, "init_noise_sigma", 1.0)) != 1.0:
            sample = sample / a0
        return run_scheduler(sched, eps, sample)

    return PeerConfig(f"diffusers {label}", "diffusers", DDPM, run)


def _edm(cls_name: str, label: str, **config: Any) -> PeerConfig | None:
    cls = diffusers_class(cls_name)
    if cls is None:
        return None

    steps_cache: dict[int, int | None] = {}

    def run(task: PeerTask, nfe: int) -> Tensor | None:
        smin, smax = task.end.ksigma, task.start.ksigma

        def make() -> Any:
            return cls(sigma_min=smin, sigma_max=smax, **config)

        sched = _steps_for(make, nfe, steps_cache)
        if sched is None:
            return None
        sd = float(sched.config.sigma_data)
        sample = task.x_T / task.start.alpha
        for t in sched.timesteps:
            sched.scale_model_input(sample, t)  # sets the step index
            sigma = float(sched.sigmas[sched.step_index])
            kn = task.knot_ksigma(sigma)
            x0 = task.D(sample * kn.alpha, kn)
            c_skip = sd**2 / (sigma**2 + sd**2)
            c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
            sample = sched.step((x0 - c_skip * sample) / c_out, t, sample).prev_sample
        return sample

    return PeerConfig(f"diffusers {label}", "diffusers", DDPM, run)


#: Where a diffusers flow scheduler's network is evaluated (:func:`flow_config`).
ModelTime = Literal["timestep", "sigma"]


def flow_config(
    cls_name: str,
    label: str,
    *,
    flow_sigmas: bool = False,
    model_time: ModelTime = "timestep",
    **config: Any,
) -> PeerConfig | None:
    """A diffusers flow scheduler ``cls_name`` (with ``use_flow_sigmas`` where
    ``flow_sigmas``; ``config`` its other settings) as a peer configuration, or None where
    diffusers is not installed. ``model_time``: the network sees ``s = timestep / 1000``
    (``"timestep"``, as pipelines call it, and as every suite configuration runs: the
    multistep schedulers' timesteps are integers, so the network's noise level can sit up
    to 1/1000 below the one the scheduler steps with), or the scheduler's own ``s``
    (``"sigma"``: the ODE the scheduler integrates; :mod:`.flow_timesteps`)."""
    check_choice("model_time", model_time, ("timestep", "sigma"))
    cls = diffusers_class(cls_name)
    if cls is None:
        return None

    steps_cache: dict[int, int | None] = {}

    def run(task: PeerTask, nfe: int) -> Tensor | None:
        def make() -> Any:
            if flow_sigmas:
                return cls(
                    use_flow_sigmas=True,
                    flow_shift=task.shift,
                    prediction_type="flow_prediction",
                    **config,
                )
            return cls(shift=task.shift, **config)

        sched = _steps_for(make, nfe, steps_cache)
        if sched is None:
            return None
        sample = task.x_T
        for i, t in enumerate(sched.timesteps):
            s = float(t) / 1000.0 if model_time == "timestep" else float(sched.sigmas[i])
            model_in = (
                sched.scale_model_input(sample, t)
                if hasattr(sched, "scale_model_input")
                else sample
            )
            x0 = task.D(model_in, task.knot_flow_sigma(s))
            sample = sched.step((model_in - x0) / s, t, sample).prev_sample
        return sample

    return PeerConfig(f"diffusers {label}", "diffusers", ("flow",), run)


def _ode(t: Any) -> float:
    """SA-Solver's tau function for the ODE (no noise)."""
    return 0.0


def _build_configs() -> list[PeerConfig]:
    specs: list[PeerConfig | None] = []
    # ---- diffusers DDPM-family schedulers (discrete natively; VP and VE through a proxy)
    dpm = "DPMSolverMultistepScheduler"
    specs += [
        _ddpm(dpm, "DPM++2M", solver_order=2),
        _ddpm(dpm, "DPM++2M karras", solver_order=2, use_karras_sigmas=True),
        _ddpm(dpm, "DPM++2M logSNR", solver_order=2, use_lu_lambdas=True),
        _ddpm(dpm, "DPM++2M exponential", solver_order=2, use_exponential_sigmas=True),
        _ddpm(
            dpm,
            "DPM++2M heun-form karras",
            solver_order=2,
            solver_type="heun",
            use_karras_sigmas=True,
        ),
        _ddpm(dpm, "DPM++3M", solver_order=3),
        _ddpm(dpm, "DPM++3M karras", solver_order=3, use_karras_sigmas=True),
        _ddpm(dpm, "DPM++3M logSNR", solver_order=3, use_lu_lambdas=True),
        _ddpm(
            dpm,
            "DPM++2M karras no lower-order final",
            solver_order=2,
            use_karras_sigmas=True,
            lower_order_final=False,
        ),
        _ddpm("DPMSolverSinglestepScheduler", "DPM++2S", solver_order=2),
        _ddpm("DPMSolverSinglestepScheduler", "DPM++3S", solver_order=3),
        _ddpm(
            "DPMSolverSinglestepScheduler", "DPM++2S karras", solver_order=2, use_karras_sigmas=True
        ),
        _ddpm("UniPCMultistepScheduler", "UniPC bh2", solver_order=2),
        _ddpm("UniPCMultistepScheduler", "UniPC bh2 o3", solver_order=3),
        _ddpm(
            "UniPCMultistepScheduler", "UniPC bh2 karras", solver_order=2, use_karras_sigmas=True
        ),
        _ddpm(
            "UniPCMultistepScheduler", "UniPC bh2 o3 karras", solver_order=3, use_karras_sigmas=True
        ),
        _ddpm("DEISMultistepScheduler", "DEIS", solver_order=2),
        _ddpm("DEISMultistepScheduler", "DEIS o3", solver_order=3),
        _ddpm(
            "SASolverScheduler",
            "SA-Solver (ODE) p2c2",
            predictor_order=2,
            corrector_order=2,
            tau_func=_ode,
        ),
        _ddpm("EulerDiscreteScheduler", "Euler"),
        _ddpm("EulerDiscreteScheduler", "Euler karras", use_karras_sigmas=True),
        _ddpm("HeunDiscreteScheduler", "Heun"),
        _ddpm("HeunDiscreteScheduler", "Heun karras", use_karras_sigmas=True),
        _ddpm("KDPM2DiscreteScheduler", "KDPM2"),
        _ddpm("KDPM2DiscreteScheduler", "KDPM2 karras", use_karras_sigmas=True),
        _ddpm("LMSDiscreteScheduler", "LMS"),
        _ddpm("LMSDiscreteScheduler", "LMS karras", use_karras_sigmas=True),
        _ddpm("DDIMScheduler", "DDIM trailing", timestep_spacing="trailing", clip_sample=False),
        _ddpm(
            "PNDMScheduler",
            "PLMS trailing",
            skip_prk_steps=True,
            set_alpha_to_one=True,
            timestep_spacing="trailing",
        ),
    ]
    # ---- diffusers EDM schedulers (on sigma~, any non-flow schedule)
    specs += [
        _edm("EDMEulerScheduler", "EDM Euler karras"),
        _edm("EDMEulerScheduler", "EDM Euler exponential", sigma_schedule="exponential"),
        _edm("EDMDPMSolverMultistepScheduler", "EDM DPM++2M karras", solver_order=2),
        _edm(
            "EDMDPMSolverMultistepScheduler",
            "EDM DPM++2M exponential",
            solver_order=2,
            sigma_schedule="exponential",
        ),
        _edm("EDMDPMSolverMultistepScheduler", "EDM DPM++3M karras", solver_order=3),
        _edm(
            "EDMDPMSolverMultistepScheduler",
            "EDM DPM++2M heun-form karras",
            solver_order=2,
            solver_type="heun",
        ),
    ]
    # ---- diffusers flow schedulers
    specs += [
        flow_config("FlowMatchEulerDiscreteScheduler", "FlowMatch Euler"),
        flow_config(
            "FlowMatchEulerDiscreteScheduler", "FlowMatch Euler karras", use_karras_sigmas=True
        ),
        flow_config(
            "FlowMatchEulerDiscreteScheduler",
            "FlowMatch Euler exponential",
            use_exponential_sigmas=True,
        ),
        flow_config("FlowMatchHeunDiscreteScheduler", "FlowMatch Heun"),
        flow_config(dpm, "DPM++2M flow", flow_sigmas=True, solver_order=2),
        flow_config(dpm, "DPM++3M flow", flow_sigmas=True, solver_order=3),
        flow_config(
            "DPMSolverSinglestepScheduler", "DPM++2S flow", flow_sigmas=True, solver_order=2
        ),
        flow_config("UniPCMultistepScheduler", "UniPC bh2 flow", flow_sigmas=True, solver_order=2),
        flow_config(
            "UniPCMultistepScheduler", "UniPC bh2 o3 flow", flow_sigmas=True, solver_order=3
        ),
        flow_config("DEISMultistepScheduler", "DEIS flow", flow_sigmas=True, solver_order=2),
        flow_config(
            "SASolverScheduler",
            "SA-Solver (ODE) flow",
            flow_sigmas=True,
            predictor_order=2,
            corrector_order=2,
            tau_func=_ode,
        ),
    ]
    # ---- k-diffusion on sigma~ (every family; "own" = the schedule's time-uniform grid)
    samplers: list[tuple[str, str, int, dict[str, Any]]] = [
        ("sample_euler", "euler", 1, {}),
        ("sample_heun", "heun", 2, {}),
        ("sample_dpm_2", "dpm_2", 2, {}),
        ("sample_lms", "lms", 1, {}),
        ("sample_dpmpp_2m", "dpmpp_2m", 1, {}),
        (
            "sample_dpmpp_2m_sde",
            "dpmpp_2m heun-form (2m_sde eta 0)",
            1,
            {"eta": 0.0, "solver_type": "heun"},
        ),
        ("sample_dpmpp_3m_sde", "dpmpp_3m (eta 0)", 1, {"eta": 0.0}),
        ("sample_dpmpp_2s_ancestral", "dpmpp_2s (eta 0)", 2, {"eta": 0.0}),
    ]
    grids: tuple[KSigmas, ...] = ("karras", "exponential", "own")
    for sig in grids:
        for fn, name, per, kw in samplers:
            specs.append(_kdiff(fn, f"k-diffusion {name} {sig}", sig, per, **kw))
    specs.append(_kdiff_fast("k-diffusion dpm_fast + denoise"))
    # ---- k-diffusion on flow sigmas (ComfyUI's way with flow models)
    for sig in grids:
        for fn, name, per, kw in samplers:
            specs.append(
                _kdiff(fn, f"k-diffusion {name} flow-sigma {sig}", sig, per, flow_mode=True, **kw)
            )
    specs.append(_kdiff_fast("k-diffusion dpm_fast + denoise flow-sigma", flow_mode=True))
    return [c for c in specs if c is not None]


_CONFIGS: list[PeerConfig] | None = None


def peer_configs(family: Family | None = None) -> list[PeerConfig]:
    """Every installed peer configuration (those that apply to ``family`` if given)."""
    global _CONFIGS
    if _CONFIGS is None:
        _CONFIGS = _build_configs()
    return [c for c in _CONFIGS if family is None or family in c.families]


def run_peer(config: PeerConfig, task: PeerTask, nfe: int) -> PeerResult:
    """Run one configuration at ``nfe``; the sample is None when the configuration cannot
    spend exactly ``nfe`` evaluations (or spent another number, or failed numerically)."""
    start = task.calls
    with torch.no_grad():
        try:
            x = config.run(task, nfe)
        except (FloatingPointError, torch.linalg.LinAlgError):
            x = None
    made = task.calls - start
    if x is None or made != nfe:
        return PeerResult(config.label, config.source, None, made)
    return PeerResult(config.label, config.source, x, made)


def run_peers(
    problem: Problem,
    guidance: float,
    labels: Tensor,
    x_T: Tensor,
    nfe: int,
    *,
    configs: Sequence[PeerConfig] | None = None,
    denoiser: Denoiser | None = None,
) -> list[PeerResult]:
    """Every applicable peer configuration on ``problem`` at guidance ``guidance`` for
    ``labels`` from ``x_T``, at exactly ``nfe`` evaluations (``denoiser``: reuse one
    already built for this guidance and these labels)."""
    den = problem.denoiser(guidance, labels) if denoiser is None else denoiser
    task = PeerTask(problem, den, x_T)
    chosen = (
        peer_configs(problem.family)
        if configs is None
        else [c for c in configs if problem.family in c.families]
    )
    return [run_peer(c, task, nfe) for c in chosen]


def config_table() -> str:
    """The configurations as a markdown table (label, source, families) with counts."""
    rows = ["| configuration | source | discrete | vp | ve | flow |", "|---|---|---|---|---|---|"]
    for c in peer_configs():
        marks = " | ".join("x" if f in c.families else "" for f in ALL)
        rows.append(f"| {c.label} | {c.source} | {marks} |")
    counts = ", ".join(f"{f}: {len(peer_configs(f))}" for f in ALL)
    return "\n".join(rows) + f"\n\n{len(peer_configs())} configurations; per family {counts}.\n"
