"""Noise schedules: what noise level each time means.

The forward process is ``x_t = alpha_t x_0 + sigma_t eps`` and every solver works in the
half log-SNR ``lambda_t = log(alpha_t / sigma_t)`` (DPM-Solver, Lu et al. 2022, Sec. 3.1),
which increases as sampling proceeds. A schedule gives ``alpha_t``, ``sigma_t``,
``lambda_t``, the inverse ``t(lambda)`` and the time value the network was trained with.

All schedule arithmetic is float64 on the host: grids and solver coefficients are computed
once per sampling run as Python floats, so no step ever waits on the accelerator.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ._validate import check_choice, check_finite_float, check_int

__all__ = [
    "ContinuousVPSchedule",
    "DiscreteVPSchedule",
    "Knot",
    "NoiseSchedule",
    "RectifiedFlowSchedule",
    "VESchedule",
    "make_schedule",
]

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass(frozen=True)
class Knot:
    """One noise level, fully resolved on the host.

    ``lam = +inf`` marks the clean end (``sigma = 0``): a step to it is the
    data-prediction step ``x = x0_hat``. ``lam = -inf`` marks pure noise (``alpha = 0``).
    """

    t: float
    lam: float
    alpha: float
    sigma: float
    model_t: float

    @property
    def ksigma(self) -> float:
        """k-diffusion's sigma, ``sigma / alpha = exp(-lambda)`` (inf at pure noise)."""
        return math.exp(-self.lam) if self.lam != -math.inf else math.inf


def _as64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _softplus(v: float) -> float:
    return v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v))


def _vp_alpha_sigma(lam: float) -> tuple[float, float]:
    """VP scales from the half log-SNR: ``alpha^2 = sigmoid(2 lam)``,
    ``sigma^2 = sigmoid(-2 lam)``."""
    if lam == math.inf:
        return 1.0, 0.0
    if lam == -math.inf:
        return 0.0, 1.0
    return math.exp(-0.5 * _softplus(-2.0 * lam)), math.exp(-0.5 * _softplus(2.0 * lam))


class NoiseSchedule(ABC):
    """Base class. Subclasses define ``lambda_`` and ``t_of_lambda``, ``log_alpha`` and
    ``log_sigma``; ``t_min``/``t_max`` bound the times a sampler may use."""

    t_min: float
    t_max: float

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha_t (float64)."""

    @abstractmethod
    def log_sigma(self, t: Tensor) -> Tensor:
        """log sigma_t (float64)."""

    @abstractmethod
    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """Inverse of ``lambda_`` (float64)."""

    def lambda_(self, t: Tensor) -> Tensor:
        """Half log-SNR ``log(alpha_t / sigma_t)``."""
        t = _as64(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha_t."""
        return torch.exp(self.log_alpha(_as64(t)))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma_t."""
        return torch.exp(self.log_sigma(_as64(t)))

    def model_time(self, t: Tensor) -> Tensor:
        """The time value the network was trained with (identity unless overridden)."""
        return _as64(t)

    def t_of_model_time(self, model_t: Tensor) -> Tensor:
        """Inverse of :meth:`model_time`."""
        return _as64(model_t)

    @property
    def starts_at_pure_noise(self) -> bool:
        """Whether ``t_max`` is pure noise (``alpha = 0``, ``lambda = -inf``: rectified flow):
        grids then take a first step out of it, and log-SNR statistics cannot start there."""
        return self.knot(self.t_max).alpha == 0.0

    def knot(self, t: float) -> Knot:
        """Resolve time ``t`` to a :class:`Knot`."""
        tt = _as64(float(t))
        return Knot(
            t=float(t),
            lam=float(self.lambda_(tt)),
            alpha=float(self.alpha(tt)),
            sigma=float(self.sigma(tt)),
            model_t=float(self.model_time(tt)),
        )

    def knot_at_lambda(self, lam: float) -> Knot:
        """Resolve a half log-SNR value to a :class:`Knot` (used for intermediate points)."""
        if lam == math.inf:
            return self.zero_knot()
        t = float(self.t_of_lambda(_as64(lam)))
        k = self.knot(t)
        # Keep the requested lambda exactly: the solver coefficients were derived from it.
        return Knot(t=k.t, lam=float(lam), alpha=k.alpha, sigma=k.sigma, model_t=k.model_t)

    def zero_knot(self) -> Knot:
        """The clean end ``sigma = 0``; the network is never evaluated there."""
        return Knot(t=0.0, lam=math.inf, alpha=1.0, sigma=0.0, model_t=0.0)

    def check_time(self, name: str, t: float) -> float:
        """Raise a clear error if ``t`` is outside ``[t_min, t_max]``."""
        t = check_finite_float(name, t)
        lo, hi = self.t_min, self.t_max
        tol = 1e-9 * max(1.0, abs(hi))
        if not (lo - tol <= t <= hi + tol):
            raise ValueError(
                f"{name}={t} is outside this schedule's time range [{lo}, {hi}] "
                f"({type(self).__name__})"
            )
        return min(max(t, lo), hi)


# --------------------------------------------------------------------------------------
# Variance preserving, discrete time (DDPM, Stable Diffusion)
# --------------------------------------------------------------------------------------


#: Each beta preset's own endpoints ``(beta_start, beta_end)``: DDPM's linear schedule (Ho
#: et al. 2020) and Stable Diffusion's scaled-linear one (as diffusers' configs give them).
PRESET_ENDPOINTS: dict[str, tuple[float, float]] = {
    "linear": (0.0001, 0.02),
    "scaled_linear": (0.00085, 0.012),
}


def betas_for_preset(
    beta_schedule: BetaSchedule,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
) -> Tensor:
    """DDPM beta presets as diffusers defines them (float64).

    ``linear`` (Ho et al. 2020), ``scaled_linear`` (Stable Diffusion: linear in sqrt(beta)),
    ``squaredcos_cap_v2`` (Nichol & Dhariwal 2021, Eq. 17, betas capped at 0.999).
    """
    check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
    n = check_int("num_train_timesteps", num_train_timesteps, minimum=2)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2

    def alpha_bar(x: float) -> float:
        return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float64)


def zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1.
    The terminal value is then set to 2**-24 (as diffusers does) so that lambda stays finite.
    """
    s = alphas_cumprod.sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)
    out = s**2
    out[-1] = 2.0**-24
    return out


class DiscreteVPSchedule(NoiseSchedule):
    """Discrete-time VP schedule of a DDPM-trained network (``alpha_i^2 = prod(1 - beta_j)``).

    Time is the training timestep index, continuous in ``[0, N-1]``; the network receives
    it unchanged. Between the knots ``lambda`` (equivalently log of k-diffusion's sigma) is
    interpolated linearly in ``t``, as k-diffusion and diffusers do; the knots are exact.

    Args:
        betas: per-step betas (length N). Give this, ``alphas_cumprod`` or a preset.
        alphas_cumprod: cumulative products of ``1 - beta``.
        beta_schedule: preset name (default ``"scaled_linear"``, Stable Diffusion's).
        beta_start, beta_end: preset endpoints (default: the preset's own, as diffusers and
            the papers define them: ``linear`` 1e-4 and 0.02 (DDPM), ``scaled_linear``
            0.00085 and 0.012 (Stable Diffusion); unused by ``squaredcos_cap_v2``).
        num_train_timesteps: N for presets (default 1000).
        rescale_zero_terminal_snr: apply Lin et al. 2023's rescaling (default False).
    """

    def __init__(
        self,
        betas: Tensor | None = None,
        alphas_cumprod: Tensor | None = None,
        *,
        beta_schedule: BetaSchedule = "scaled_linear",
        beta_start: float | None = None,
        beta_end: float | None = None,
        num_train_timesteps: int = 1000,
        rescale_zero_terminal_snr: bool = False,
    ) -> None:
        if betas is not None and alphas_cumprod is not None:
            raise ValueError("give at most one of betas and alphas_cumprod")
        if alphas_cumprod is None:
            if betas is None:
                start, end = PRESET_ENDPOINTS.get(beta_schedule, (0.0001, 0.02))
                betas = betas_for_preset(
                    beta_schedule,
                    num_train_timesteps,
                    start if beta_start is None else beta_start,
                    end if beta_end is None else beta_end,
                )
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten().cpu()
            if not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("betas must lie in (0, 1)")
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        if acp.numel() < 2:
            raise ValueError("alphas_cumprod needs at least 2 entries")
        if rescale_zero_terminal_snr:
            acp = zero_terminal_snr(acp)
        if not bool(((acp > 0) & (acp <= 1)).all()) or not bool((acp[1:] < acp[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1]")
        self.alphas_cumprod = acp
        self.num_train_timesteps = acp.numel()
        # lambda_i = 0.5 log(acp / (1 - acp)); decreasing in i.
        self._lams = 0.5 * (torch.log(acp) - torch.log1p(-acp))
        self._neg_lams = -self._lams  # increasing, for searchsorted
        self._neg_lams_list: list[float] = self._neg_lams.tolist()
        self.t_min = 0.0
        self.t_max = float(self.num_train_timesteps - 1)

    def lambda_(self, t: Tensor) -> Tensor:
        t = _as64(t)
        return _interp(t, torch.arange(self.num_train_timesteps, dtype=torch.float64), self._lams)

    def log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * torch.nn.functional.logsigmoid(2.0 * self.lambda_(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.nn.functional.logsigmoid(-2.0 * self.lambda_(t))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        ts = torch.arange(self.num_train_timesteps, dtype=torch.float64)
        return _interp(-_as64(lam), self._neg_lams, ts)

    def knot_at_lambda(self, lam: float) -> Knot:
        # Scalar fast path: solvers resolve intermediate knots every step.
        if lam == math.inf:
            return self.zero_knot()
        nl = self._neg_lams_list
        i = min(max(bisect.bisect_left(nl, -lam), 1), len(nl) - 1)
        t = (i - 1) + (-lam - nl[i - 1]) / (nl[i] - nl[i - 1])
        a, s = _vp_alpha_sigma(lam)
        return Knot(t=t, lam=float(lam), alpha=a, sigma=s, model_t=t)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation on increasing ``xp``, linear extrapolation outside."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


# --------------------------------------------------------------------------------------
# Variance preserving, continuous time (score SDE linear, improved-DDPM cosine)
# --------------------------------------------------------------------------------------


class ContinuousVPSchedule(NoiseSchedule):
    """Continuous-time VP schedules on ``t in [eps, T]``.

    ``linear`` (Song et al. 2021, VP-SDE): ``log alpha_t = -(b1 - b0) t^2 / 4 - b0 t / 2``
    with ``b0 = 0.1, b1 = 20``. ``cosine`` (Nichol & Dhariwal 2021):
    ``log alpha_t = log cos((t + s)/(1 + s) pi/2) - log cos(s/(1 + s) pi/2)``, ``s = 0.008``,
    with ``T = 0.9946`` so that lambda stays bounded (the DPM-Solver paper's clipping).
    The inverses are closed form (DPM-Solver, App. D.1).

    Args:
        kind: ``"linear"`` or ``"cosine"``.
        beta_min, beta_max: linear-schedule endpoints (default 0.1, 20).
        t_min: smallest sampling time (default 1e-3 linear, 1e-3 cosine).
        t_max: largest sampling time (default 1, or 0.9946 for cosine).
        model_time_scale: the network receives ``model_time_scale * t`` (default 1;
            use 1000 for networks trained on ``1000 t``).
    """

    _COS_S = 0.008

    def __init__(
        self,
        kind: Literal["linear", "cosine"] = "linear",
        *,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        t_min: float = 1e-3,
        t_max: float | None = None,
        model_time_scale: float = 1.0,
    ) -> None:
        self.kind = check_choice("kind", kind, ("linear", "cosine"))
        self.beta_min = check_finite_float("beta_min", beta_min, positive=True)
        self.beta_max = check_finite_float("beta_max", beta_max, positive=True)
        if self.beta_max <= self.beta_min:
            raise ValueError("beta_max must be > beta_min")
        s = self._COS_S
        self._cos_log_alpha0 = math.log(math.cos(s / (1 + s) * math.pi / 2))
        default_max = 1.0 if kind == "linear" else 0.9946
        self.t_max = check_finite_float(
            "t_max", default_max if t_max is None else t_max, positive=True
        )
        self.t_min = check_finite_float("t_min", t_min, positive=True)
        if self.t_min >= self.t_max:
            raise ValueError(f"t_min={t_min} must be < t_max={self.t_max}")
        if kind == "cosine" and self.t_max >= 1.0:
            raise ValueError("t_max must be < 1 for the cosine schedule (alpha reaches 0 at 1)")
        self.model_time_scale = check_finite_float(
            "model_time_scale", model_time_scale, positive=True
        )

    def log_alpha(self, t: Tensor) -> Tensor:
        t = _as64(t)
        if self.kind == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        s = self._COS_S
        return torch.log(torch.cos((t + s) / (1 + s) * math.pi / 2)) - self._cos_log_alpha0

    def log_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = _as64(lam)
        if self.kind == "linear":
            tmp = (
                2.0
                * (self.beta_max - self.beta_min)
                * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
            )
            delta = self.beta_min**2 + tmp
            return tmp / (torch.sqrt(delta) + self.beta_min) / (self.beta_max - self.beta_min)
        s = self._COS_S
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return (
            torch.arccos(torch.exp(log_alpha + self._cos_log_alpha0)) * 2.0 * (1 + s) / math.pi - s
        )

    def knot_at_lambda(self, lam: float) -> Knot:
        if math.isinf(lam):
            return super().knot_at_lambda(lam)
        t = float(self.t_of_lambda(_as64(lam)))
        a, s = _vp_alpha_sigma(lam)
        return Knot(t=t, lam=float(lam), alpha=a, sigma=s, model_t=self.model_time_scale * t)

    def model_time(self, t: Tensor) -> Tensor:
        return self.model_time_scale * _as64(t)

    def t_of_model_time(self, model_t: Tensor) -> Tensor:
        return _as64(model_t) / self.model_time_scale


# --------------------------------------------------------------------------------------
# Variance exploding / EDM
# --------------------------------------------------------------------------------------


class VESchedule(NoiseSchedule):
    """Variance-exploding schedule, ``alpha = 1, sigma = t`` (Song et al. 2021; Karras et
    al. 2022, "EDM", Table 1). Time *is* sigma, and the network receives sigma.

    Args:
        sigma_min: smallest sampling sigma (default 0.002, EDM's).
        sigma_max: largest sampling sigma (default 80, EDM's).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        self.t_min = check_finite_float("sigma_min", sigma_min, positive=True)
        self.t_max = check_finite_float("sigma_max", sigma_max, positive=True)
        if self.t_min >= self.t_max:
            raise ValueError(f"sigma_min={sigma_min} must be < sigma_max={sigma_max}")

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(_as64(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(_as64(t))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-_as64(lam))


# --------------------------------------------------------------------------------------
# Rectified flow
# --------------------------------------------------------------------------------------


class RectifiedFlowSchedule(NoiseSchedule):
    """Rectified-flow / flow-matching schedule, ``alpha = 1 - s, sigma = s``
    (Liu et al. 2023; Esser et al. 2024, "SD3", Sec. 3).

    The sampling time ``t in [0, 1]`` is mapped through SD3's shift
    ``s = shift t / (1 + (shift - 1) t)``, so a time-uniform grid reproduces SD3/Flux
    spacings while log-SNR grids are unaffected. ``t = 1`` is pure noise
    (``lambda = -inf``); solvers take a first-order step out of it.

    Args:
        shift: time shift (default 1, no shift; SD3 uses 3).
        t_min: smallest sampling time (default 1e-3).
        t_max: largest sampling time (default 1).
        model_time_scale: the network receives ``model_time_scale * sigma`` (default 1000,
            diffusers' flow transformers; use 1 for networks taking sigma itself).
    """

    def __init__(
        self,
        shift: float = 1.0,
        *,
        t_min: float = 1e-3,
        t_max: float = 1.0,
        model_time_scale: float = 1000.0,
    ) -> None:
        self.shift = check_finite_float("shift", shift, positive=True)
        self.t_min = check_finite_float("t_min", t_min, positive=True)
        self.t_max = check_finite_float("t_max", t_max, positive=True)
        if not (self.t_min < self.t_max <= 1.0):
            raise ValueError(f"need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        self.model_time_scale = check_finite_float(
            "model_time_scale", model_time_scale, positive=True
        )

    def shifted(self, t: Tensor) -> Tensor:
        """The shifted noise level ``s(t)`` (= sigma)."""
        t = _as64(t)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-self.shifted(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(self.shifted(t))

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        s = torch.sigmoid(-_as64(lam))
        return s / (self.shift - (self.shift - 1.0) * s)

    def model_time(self, t: Tensor) -> Tensor:
        return self.model_time_scale * self.shifted(t)

    def t_of_model_time(self, model_t: Tensor) -> Tensor:
        s = _as64(model_t) / self.model_time_scale
        return s / (self.shift - (self.shift - 1.0) * s)


ScheduleName = Literal["discrete", "vp_linear", "vp_cosine", "ve", "edm", "flow"]


def make_schedule(name: ScheduleName, **kwargs: object) -> NoiseSchedule:
    """Build a schedule by name: ``discrete`` (DDPM/SD), ``vp_linear``, ``vp_cosine``,
    ``ve`` / ``edm`` (alpha = 1), ``flow`` (rectified flow). Keyword arguments go to the
    class."""
    check_choice("schedule", name, ("discrete", "vp_linear", "vp_cosine", "ve", "edm", "flow"))
    if name == "discrete":
        return DiscreteVPSchedule(**kwargs)  # type: ignore[arg-type]
    if name == "vp_linear":
        return ContinuousVPSchedule("linear", **kwargs)  # type: ignore[arg-type]
    if name == "vp_cosine":
        return ContinuousVPSchedule("cosine", **kwargs)  # type: ignore[arg-type]
    if name in ("ve", "edm"):
        return VESchedule(**kwargs)  # type: ignore[arg-type]
    return RectifiedFlowSchedule(**kwargs)  # type: ignore[arg-type]
