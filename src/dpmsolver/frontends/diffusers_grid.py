"""Time grids built the way diffusers' schedulers build them (facts about diffusers 0.3x,
reproduced so that a scheduler swap keeps the timesteps a pipeline was tuned with).

Discrete VP (DDPM / Stable Diffusion), as ``DPMSolverMultistepScheduler.set_timesteps``:

- betas and their cumulative product are float32 (the values the networks were trained with);
- ``timestep_spacing`` ``linspace`` / ``leading`` / ``trailing`` (Lin et al. 2023, Table 2)
  gives integer timesteps, from which the noise levels are read exactly;
- Karras (EDM Eq. 5, rho = 7), exponential and log-SNR-uniform (DPM-Solver Sec. 3.3) spacings
  place ``n`` noise levels between the schedule's extremes *inclusive*; the network time of
  each is the timestep with that noise level, rounded to an integer (truncated for the
  exponential spacing and for ``squaredcos_cap_v2``), while the solver keeps the unrounded
  level. With ``final_sigmas_type="sigma_min"`` these grids therefore end with a zero-length
  step (the last level repeated), which is a no-op.

Flow matching: ``FlowMatchEulerDiscreteScheduler``'s construction (SD3 / Flux): sigmas spaced
linearly between its (already shifted) extremes, shifted once more (statically, or by
``exp(mu)`` with dynamic shifting), optionally stretched to ``shift_terminal``, network time
``sigma * num_train_timesteps``; and ``DPMSolverMultistepScheduler``'s ``use_flow_sigmas``
construction (truncated integer network times).

Every function returns :class:`~dpmsolver.schedules.Knot` s (noise level and network time) or
plain arrays; nothing here imports diffusers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._validate import check_choice, check_int
from ..parameterization import Prediction
from ..schedules import (
    DiscreteVPSchedule,
    Knot,
    NoiseSchedule,
    RectifiedFlowSchedule,
    betas_for_preset,
)
from ..timegrid import GridKind, make_grid

__all__ = [
    "SIGMA_SPACINGS",
    "TIMESTEP_SPACINGS",
    "beta_sigmas",
    "diffusers_alphas_cumprod",
    "diffusers_times",
    "dpm_flow_sigmas",
    "flow_knots",
    "flowmatch_sigmas",
    "knots_at",
    "prediction_from_diffusers_config",
    "schedule_from_diffusers_config",
    "singlestep_groups",
    "unipc_flow_sigmas",
    "vp_knots",
    "vp_timesteps",
]

TimestepSpacing = Literal["linspace", "leading", "trailing"]
SigmaSpacing = Literal["timesteps", "karras", "exponential", "logsnr", "beta"]
TIMESTEP_SPACINGS: tuple[TimestepSpacing, ...] = ("linspace", "leading", "trailing")
SIGMA_SPACINGS: tuple[SigmaSpacing, ...] = ("timesteps", "karras", "exponential", "logsnr", "beta")
FinalSigma = Literal["zero", "sigma_min"]


def diffusers_alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | Tensor | None = None,
    rescale_zero_snr: bool = False,
) -> Tensor:
    """``alphas_cumprod`` as diffusers computes it: float32 betas, float32 cumulative product
    (returned as float64 holding those float32 values), optionally rescaled to zero
    terminal SNR."""
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float32).flatten()
    else:
        check_choice(
            "beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2")
        )
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = (
                torch.linspace(
                    beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32
                )
                ** 2
            )
        else:
            betas = betas_for_preset("squaredcos_cap_v2", num_train_timesteps).to(torch.float32)
    if rescale_zero_snr:
        # Lin et al. 2023, Alg. 1, on the float32 betas as diffusers does it; the last value
        # is then 2**-24, as diffusers' DPM-Solver schedulers set it, so lambda stays finite.
        acp_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = acp_sqrt[0].clone(), acp_sqrt[-1].clone()
        acp_sqrt = (acp_sqrt - last) * (first / (first - last))
        acp = acp_sqrt**2
        betas = 1 - torch.cat([acp[0:1], acp[1:] / acp[:-1]])
        out = torch.cumprod(1.0 - betas, dim=0)
        out[-1] = 2.0**-24
        return out.to(torch.float64)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


_PREDICTIONS: dict[str, Prediction] = {
    "epsilon": "eps",
    "sample": "x0",
    "v_prediction": "v",
    "flow_prediction": "flow",
}


def _is_flow(config: Mapping[str, Any]) -> bool:
    return (
        str(config.get("_class_name", "")).startswith("FlowMatch")
        or config.get("prediction_type") == "flow_prediction"
        or bool(config.get("use_flow_sigmas", False))
        or ("shift" in config and "beta_schedule" not in config)
    )


def prediction_from_diffusers_config(config: Mapping[str, Any]) -> Prediction:
    """What a network behind this diffusers scheduler config predicts: its
    ``prediction_type`` (``epsilon``/``sample``/``v_prediction``/``flow_prediction``), and
    ``flow`` for the flow-matching schedulers (which have no such key)."""
    if _is_flow(config) and "prediction_type" not in config:
        return "flow"
    pred = str(config.get("prediction_type", "epsilon"))
    check_choice("prediction_type", pred, tuple(_PREDICTIONS))
    return _PREDICTIONS[pred]


def schedule_from_diffusers_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The noise schedule a network was trained with, from its diffusers scheduler config
    (``pipe.scheduler.config`` or a ``scheduler_config.json``).

    Discrete VP (DDPM, Stable Diffusion): ``num_train_timesteps``, ``beta_schedule``
    (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) with ``beta_start`` /
    ``beta_end`` (diffusers' defaults 1e-4 / 0.02 where a config omits them), or
    ``trained_betas``; ``rescale_betas_zero_snr`` (Lin et al. 2023). The betas and their
    product are float32, as diffusers computes them. Flow matching (``FlowMatch*``
    configs, ``prediction_type="flow_prediction"`` or ``use_flow_sigmas``): a
    :class:`~dpmsolver.schedules.RectifiedFlowSchedule` with the config's static shift
    (``shift``, or ``flow_shift``) and network time ``num_train_timesteps * sigma``. A
    dynamically shifted config (Flux) has no single schedule: pass the resolution's shift.
    """
    n = check_int("num_train_timesteps", int(config.get("num_train_timesteps", 1000)), minimum=2)
    if _is_flow(config):
        if config.get("use_dynamic_shifting", False):
            raise ValueError(
                "use_dynamic_shifting=True: the shift depends on the image size (mu); build "
                "RectifiedFlowSchedule(shift=exp(mu)) for the resolution you sample at"
            )
        key = "flow_shift" if config.get("use_flow_sigmas", False) else "shift"
        shift = float(config.get(key, 1.0))
        return RectifiedFlowSchedule(shift=shift, t_min=1.0 / n, model_time_scale=float(n))
    acp = diffusers_alphas_cumprod(
        n,
        float(config.get("beta_start", 0.0001)),
        float(config.get("beta_end", 0.02)),
        str(config.get("beta_schedule", "linear")),
        config.get("trained_betas"),
        bool(config.get("rescale_betas_zero_snr", False)),
    )
    return DiscreteVPSchedule(alphas_cumprod=acp)


def last_timestep(schedule: DiscreteVPSchedule, lambda_min_clipped: float) -> int:
    """One past the noisiest timestep whose half log-SNR is >= ``lambda_min_clipped``
    (diffusers' clipping for the cosine schedule)."""
    clipped = int(
        (schedule.lambda_(torch.arange(schedule.num_train_timesteps)) < lambda_min_clipped).sum()
    )
    return schedule.num_train_timesteps - clipped


def vp_timesteps(
    n: int, num_train_timesteps: int, spacing: TimestepSpacing, steps_offset: int, last: int
) -> list[int]:
    """Decreasing integer timesteps for ``n`` steps (Lin et al. 2023, Table 2). ``n`` must
    not exceed what the spacing can give without repeating a timestep (a one-line error
    names the largest that works)."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    ts = _spaced(n, num_train_timesteps, spacing, steps_offset, last)
    if len(ts) != n or len(set(ts)) != n:
        most = min(n, last)
        while most > 1:
            cand = _spaced(most, num_train_timesteps, spacing, steps_offset, last)
            if len(cand) == most and len(set(cand)) == most:
                break
            most -= 1
        raise ValueError(
            f"num_inference_steps={n} is more than timestep_spacing={spacing!r} spaces "
            f"distinctly over {last} training timesteps; use at most {most}"
        )
    return ts


def _spaced(
    n: int, num_train_timesteps: int, spacing: TimestepSpacing, steps_offset: int, last: int
) -> list[int]:
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + steps_offset
    else:
        ts = np.arange(last, 0, -num_train_timesteps / n).round() - 1
    return [int(v) for v in ts.astype(np.int64)]


def _final_knot(
    schedule: DiscreteVPSchedule | RectifiedFlowSchedule, final: FinalSigma, sigma_min_t: float
) -> Knot:
    check_choice("final_sigmas_type", final, ("zero", "sigma_min"))
    return schedule.zero_knot() if final == "zero" else schedule.knot(sigma_min_t)


def knots_at(schedule: NoiseSchedule, times: Sequence[float]) -> list[Knot]:
    """``[schedule.knot(t) for t in times]`` computed in one vectorized pass (a grid of
    hundreds of timesteps resolves in well under a millisecond)."""
    tt = torch.as_tensor([float(t) for t in times], dtype=torch.float64)
    rows = zip(
        tt.tolist(),
        schedule.lambda_(tt).tolist(),
        schedule.alpha(tt).tolist(),
        schedule.sigma(tt).tolist(),
        schedule.model_time(tt).tolist(),
        strict=True,
    )
    return [Knot(t=t, lam=lam, alpha=a, sigma=sg, model_t=mt) for t, lam, a, sg, mt in rows]


def vp_knots(
    schedule: DiscreteVPSchedule,
    n: int,
    *,
    spacing: TimestepSpacing = "linspace",
    sigmas: SigmaSpacing = "timesteps",
    steps_offset: int = 0,
    lambda_min_clipped: float = -math.inf,
    truncate: bool = False,
    final: FinalSigma = "zero",
) -> list[Knot]:
    """The ``n`` noisy knots of a discrete-VP sampling grid, plus the final knot.

    Args:
        schedule: the discrete schedule.
        n: number of noisy knots (``num_inference_steps``).
        spacing: timestep spacing, used when ``sigmas="timesteps"``.
        sigmas: ``"timesteps"`` (levels of the integer timesteps), ``"karras"``,
            ``"exponential"`` or ``"logsnr"`` (both uniform in lambda; they differ only in
            how the network time is made an integer), or ``"beta"`` (diffusers'
            ``use_beta_sigmas``: k-diffusion sigmas at the quantiles of Beta(0.6, 0.6),
            Lee et al. 2024; needs scipy, as in diffusers).
        steps_offset, lambda_min_clipped: as diffusers.
        truncate: truncate rather than round the network times of Karras / log-SNR knots
            (diffusers does so for ``squaredcos_cap_v2``).
        final: ``"zero"`` (end at sigma = 0) or ``"sigma_min"`` (end at timestep 0).
    """
    n = check_int("num_inference_steps", n, minimum=1)
    check_choice("sigma spacing", sigmas, SIGMA_SPACINGS)
    final_knot = _final_knot(schedule, final, 0.0)
    if sigmas == "timesteps":
        last = last_timestep(schedule, lambda_min_clipped)
        ts = vp_timesteps(n, schedule.num_train_timesteps, spacing, steps_offset, last)
        return [*knots_at(schedule, ts), final_knot]
    if sigmas == "beta":
        base = [schedule.knot_at_lambda(-math.log(v)) for v in beta_sigmas(schedule, n)]
    elif n == 1:
        base = [schedule.knot(schedule.t_max)]
    else:
        kind: GridKind = "karras" if sigmas == "karras" else "logsnr"
        base = list(make_grid(schedule, n - 1, kind, final="t_min").knots)
    to_int = math.trunc if truncate or sigmas in ("exponential", "beta") else round
    times = diffusers_times(schedule, sigmas, n)
    return [
        dataclasses.replace(k, model_t=float(to_int(t))) for k, t in zip(base, times, strict=True)
    ] + [final_knot]


def diffusers_times(schedule: DiscreteVPSchedule, sigmas: SigmaSpacing, n: int) -> list[float]:
    """The network times diffusers gives the ``n`` levels of a Karras / exponential /
    log-SNR / Beta grid, before making them integers: its levels computed from its float32
    sigma table, then its ``_sigma_to_t`` (piecewise-linear in log sigma against that
    table). Reproduced operation for operation, so that a time that lands a hair below an
    integer there (the first exponential one: 998.99..., truncated to 998) does here too;
    the solver keeps the exact levels of the grid."""
    acp = schedule.alphas_cumprod.to(torch.float32)
    table = (((1 - acp) / acp) ** 0.5).numpy()  # float32, as diffusers
    log_table = np.log(table)
    smax, smin = table[-1].item(), table[0].item()
    if sigmas == "karras":
        levels = _karras(smax, smin, n)
    elif sigmas == "beta":
        levels = _beta_between(smax, smin, n)
    else:  # exponential, and log-SNR (uniform in log sigma)
        levels = np.exp(np.linspace(math.log(smax), math.log(smin), n))
    log_sigma = np.log(np.maximum(levels, 1e-10))
    dists = log_sigma - log_table[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_table.shape[0] - 2)
    high = low + 1
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[high]), 0, 1)
    return [float(t) for t in (1 - w) * low + w * high]


def beta_sigmas(schedule: DiscreteVPSchedule, n: int) -> list[float]:
    """k-diffusion sigmas of diffusers' ``use_beta_sigmas`` (its ``_convert_to_beta`` with
    alpha = beta = 0.6, Lee et al. 2024, "Beta Sampling is All You Need"), from the
    schedule's largest to its smallest level."""
    acp = schedule.alphas_cumprod.to(torch.float32)  # diffusers' float32 levels
    levels = ((1 - acp) / acp) ** 0.5
    return [float(v) for v in _beta_between(float(levels[-1]), float(levels[0]), n)]


def _beta_between(smax: float, smin: float, n: int) -> np.ndarray:
    """``n`` levels from ``smax`` to ``smin`` at the quantiles of Beta(0.6, 0.6)."""
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is a test extra
        raise ImportError(
            "use_beta_sigmas needs scipy (pip install scipy), as in diffusers"
        ) from None
    ppf = np.array([stats.beta.ppf(q, 0.6, 0.6) for q in 1 - np.linspace(0, 1, n)])
    return np.asarray(smin + ppf * (smax - smin), dtype=np.float64)


def _karras(smax: float, smin: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    return (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


def _shift_levels(
    values: np.ndarray,
    *,
    shift: float,
    use_dynamic_shifting: bool,
    mu: float | None,
    time_shift_type: Literal["exponential", "linear"],
    shift_terminal: float | None,
) -> np.ndarray:
    """Flow noise levels ``s`` shifted as diffusers' flow schedulers shift them (their
    ``time_shift`` and ``stretch_shift_to_terminal``).

    With ``use_dynamic_shifting`` the shift depends on the image size through ``mu``
    (Flux): ``e^mu / (e^mu + 1/s - 1)``, or ``mu / (mu + 1/s - 1)`` for
    ``time_shift_type="linear"``; otherwise SD3's static shift
    ``shift s / (1 + (shift - 1) s)`` (Esser et al. 2024, as
    :class:`~dpmsolver.schedules.RectifiedFlowSchedule`). A ``shift_terminal`` then
    stretches ``1 - s`` so that the last level becomes ``shift_terminal``."""
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        if time_shift_type == "exponential":
            values = math.exp(mu) / (math.exp(mu) + (1 / values - 1))
        else:
            values = mu / (mu + (1 / values - 1))
    else:
        values = shift * values / (1 + (shift - 1) * values)
    if shift_terminal:
        one_minus = 1 - values
        values = 1 - one_minus / (one_minus[-1] / (1 - shift_terminal))
    return values


def flowmatch_sigmas(
    n: int | None,
    *,
    num_train_timesteps: int = 1000,
    shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: Literal["exponential", "linear"] = "exponential",
    shift_terminal: float | None = None,
    sigma_spacing: SigmaSpacing = "timesteps",
    sigmas: Sequence[float] | None = None,
) -> np.ndarray:
    """Noise levels of ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (without the final 0).

    Args:
        n: number of steps (may be None when ``sigmas`` is given).
        num_train_timesteps, shift, use_dynamic_shifting, time_shift_type, shift_terminal:
            as the diffusers config.
        mu: exponent of the dynamic shift (required with ``use_dynamic_shifting``).
        sigma_spacing: ``"karras"`` / ``"exponential"`` / ``"beta"`` respace the levels (in
            flow sigma, as diffusers does), ``"logsnr"`` uniformly in lambda (needs a first
            level below 1); ``"timesteps"`` keeps them.
        sigmas: custom (unshifted) levels, as Flux passes them.
    """
    if use_dynamic_shifting and mu is None:
        raise ValueError("mu must be passed to set_timesteps when use_dynamic_shifting=True")
    check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
    train = np.linspace(1, num_train_timesteps, num_train_timesteps)[::-1] / num_train_timesteps
    if not use_dynamic_shifting:
        train = shift * train / (1 + (shift - 1) * train)
    if sigmas is None:
        n = check_int("num_inference_steps", n, minimum=1)
        # The extremes are already shifted; the spaced values are shifted once more below,
        # exactly as diffusers does, so the timesteps match its scheduler's.
        values = np.linspace(train[0] * num_train_timesteps, train[-1] * num_train_timesteps, n)
        values = values / num_train_timesteps
    else:
        values = np.asarray(sigmas, dtype=np.float64)
        n = len(values)
    values = _shift_levels(
        values,
        shift=shift,
        use_dynamic_shifting=use_dynamic_shifting,
        mu=mu,
        time_shift_type=time_shift_type,
        shift_terminal=shift_terminal,
    )
    if sigma_spacing == "karras":
        values = _karras(float(values[0]), float(values[-1]), n)
    elif sigma_spacing == "exponential":
        values = np.exp(np.linspace(math.log(values[0]), math.log(values[-1]), n))
    elif sigma_spacing == "beta":
        values = _beta_between(float(values[0]), float(values[-1]), n)
    elif sigma_spacing == "logsnr":
        if values[0] >= 1.0:
            raise ValueError(
                "use_lu_lambdas needs a first flow sigma below 1 (the log-SNR of sigma = 1 is "
                "-inf); pass sigmas starting below 1, or use use_karras_sigmas"
            )
        # Uniform in lambda = log((1 - sigma) / sigma), i.e. sigma = sigmoid(-lambda).
        lams = np.linspace(
            math.log((1 - values[0]) / values[0]), math.log((1 - values[-1]) / values[-1]), n
        )
        values = 1.0 / (1.0 + np.exp(lams))
    return np.asarray(values, dtype=np.float64)


def dpm_flow_sigmas(n: int, num_train_timesteps: int, flow_shift: float) -> np.ndarray:
    """Noise levels of ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas`` (no final 0)."""
    n = check_int("num_inference_steps", n, minimum=1)
    s = 1.0 - np.linspace(1, 1 / num_train_timesteps, n + 1)
    return np.flip(flow_shift * s / (1 + (flow_shift - 1) * s))[:-1].copy()


def unipc_flow_sigmas(
    n: int | None,
    *,
    num_train_timesteps: int,
    flow_shift: float = 1.0,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: Literal["exponential", "linear"] = "exponential",
    shift_terminal: float | None = None,
    sigmas: Sequence[float] | None = None,
) -> np.ndarray:
    """Noise levels of ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` (no final level):
    ``n`` levels spaced linearly from 1 down to ``1/N`` (or custom ``sigmas``), shifted
    (statically by ``flow_shift``, or by ``mu``), optionally stretched to
    ``shift_terminal``, and a first level of 1 moved to ``1 - 1e-6`` as diffusers does to
    keep its log-SNR finite."""
    if sigmas is None:
        n = check_int("num_inference_steps", n, minimum=1)
        values = np.linspace(1, 1 / num_train_timesteps, n + 1)[:-1]
    else:
        values = np.asarray(sigmas, dtype=np.float64)
    values = _shift_levels(
        values,
        shift=flow_shift,
        use_dynamic_shifting=use_dynamic_shifting,
        mu=mu,
        time_shift_type=time_shift_type,
        shift_terminal=shift_terminal,
    )
    values = np.array(values, dtype=np.float64)
    if abs(values[0] - 1) < 1e-6:
        values[0] -= 1e-6
    return values


def flow_knots(
    schedule: RectifiedFlowSchedule,
    sigmas: Sequence[float] | np.ndarray,
    *,
    num_train_timesteps: int,
    truncate: bool = False,
    final: FinalSigma = "zero",
    sigma_min: float | None = None,
) -> list[Knot]:
    """Knots at flow noise levels ``sigmas`` (``alpha = 1 - sigma``) with network time
    ``sigma * num_train_timesteps`` (truncated to an integer if ``truncate``), plus the final
    knot (``sigma_min``: the smallest level the scheduler trains on, default the last one).
    ``schedule`` must be unshifted: the levels are already shifted."""
    if schedule.shift != 1.0:
        raise ValueError("flow_knots needs an unshifted RectifiedFlowSchedule (shift=1)")
    knots = []
    for i, v in enumerate(float(x) for x in sigmas):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"sigmas[{i}]={v} must lie in (0, 1] for a flow schedule")
        mt = v * num_train_timesteps
        knots.append(
            dataclasses.replace(schedule.knot(v), model_t=float(math.trunc(mt)) if truncate else mt)
        )
    end = float(sigmas[-1]) if sigma_min is None else sigma_min
    return [*knots, _final_knot(schedule, final, end)]


def singlestep_groups(
    n: int, order: int, *, lower_order_final: bool, final_zero: bool
) -> list[int]:
    """Orders of the singlestep steps covering ``n`` grid intervals, by
    ``DPMSolverSinglestepScheduler``'s rule: full-order steps; with ``lower_order_final`` a
    remainder of ``n mod order`` intervals becomes one last lower-order step, and when
    nothing remains the last full step is split into orders ``order - 1`` and 1; a step into
    sigma = 0 is first order. Without ``lower_order_final`` ``n`` must be a multiple of
    ``order`` and the end must not be sigma = 0 (diffusers then switches it on)."""
    check_choice("solver_order", order, (1, 2, 3))
    n = check_int("num_inference_steps", n, minimum=1)
    rem = n % order
    if not lower_order_final and (rem != 0 or final_zero):
        lower_order_final = True
    if order == 1 or not lower_order_final:
        groups = [order] * (n // order)
    elif rem:
        groups = [order] * (n // order) + [rem]
    else:
        groups = [order] * (n // order - 1) + [order - 1, 1]
    if final_zero and groups[-1] > 1:
        groups[-1:] = [groups[-1] - 1, 1]
    return groups
