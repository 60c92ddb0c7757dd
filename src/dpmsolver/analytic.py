"""Analytic diffusion models with exact denoisers, and a reference ODE solution.

For data ``x0 ~ sum_k pi_k N(mu_k, diag(s_k^2))`` the noisy marginal is a mixture too,
``x_t | k ~ N(alpha mu_k, diag(alpha^2 s_k^2 + sigma^2))``, and the ideal denoiser is the
closed-form posterior mean (e.g. Karras et al. 2022, App. B.3 for the isotropic case)

    E[x0 | x_t] = sum_k w_k(x_t) [mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)]

with responsibilities ``w_k`` proportional to ``pi_k N(x_t; alpha mu_k, alpha^2 s_k^2 + sigma^2)``.
Every component carries a class label, so the class-conditional denoiser (restrict to that
class's components) and therefore classifier-free guidance are exact too. These models are
used by the order tests, the benchmarks and the demos: any solver error measured on them is
the solver's own.

:func:`reference_solve` integrates the probability-flow ODE with an adaptive
Dormand-Prince 5(4) method in k-diffusion's variables (``x~ = x / alpha``,
``rho = log(sigma / alpha)``, ``dx~/drho = x~ - D``), independent of every solver here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validate import check_choice, check_int
from .denoiser import Denoiser
from .parameterization import PREDICTIONS, Prediction, data_coefficients
from .schedules import Knot, NoiseSchedule

__all__ = [
    "GaussianMixture",
    "MixtureDenoiser",
    "MixtureNetwork",
    "default_mixture",
    "reference_sample",
    "reference_solve",
]


@dataclass(frozen=True)
class GaussianMixture:
    """A class-labelled diagonal Gaussian mixture on flattened vectors of size ``dim``.

    Attributes:
        means: ``(K, D)`` component means.
        stds: ``(K, D)`` component standard deviations (> 0).
        weights: ``(K,)`` mixture weights (normalized on construction).
        labels: ``(K,)`` class of each component, in ``[0, num_classes)``.
        num_classes: number of classes; label ``num_classes`` means "unconditional".
        shape: per-sample shape the flat vectors are reshaped to (default ``(D,)``).
    """

    means: Tensor
    stds: Tensor
    weights: Tensor
    labels: Tensor
    num_classes: int
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.means, dtype=torch.float64)
        if m.ndim != 2:
            raise ValueError("means must have shape (K, D)")
        s = torch.as_tensor(self.stds, dtype=torch.float64).expand_as(m).clone()
        if not bool((s > 0).all()):
            raise ValueError("stds must be > 0")
        w = torch.as_tensor(self.weights, dtype=torch.float64)
        lab = torch.as_tensor(self.labels, dtype=torch.long)
        if w.shape != (m.shape[0],) or lab.shape != (m.shape[0],):
            raise ValueError("weights and labels must have shape (K,)")
        if not bool((lab >= 0).all() and (lab < self.num_classes).all()):
            raise ValueError("labels must lie in [0, num_classes)")
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "stds", s)
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "labels", lab)
        shape = tuple(self.shape) or (m.shape[1],)
        if math.prod(shape) != m.shape[1]:
            raise ValueError(f"shape {shape} does not hold {m.shape[1]} values")
        object.__setattr__(self, "shape", shape)

    @property
    def dim(self) -> int:
        """Flattened data dimension D."""
        return int(self.means.shape[1])

    def _log_resp_terms(
        self, xf: Tensor, alpha: Tensor, sigma: Tensor, y: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Per-component log-likelihood terms (B, K) and variances (B, K, D) at x_t."""
        mu, s2 = self.means.to(xf), self.stds.to(xf) ** 2
        a = alpha.view(-1, 1, 1)
        var = a * a * s2 + (sigma * sigma).view(-1, 1, 1)  # (B, K, D)
        diff = xf[:, None, :] - a * mu  # (B, K, D)
        logp = torch.log(self.weights.to(xf)) - 0.5 * ((diff * diff / var) + torch.log(2 * math.pi * var)).sum(-1)
        if y is not None:
            y = y.to(xf.device).view(-1, 1)
            allowed = (self.labels.to(xf.device).view(1, -1) == y) | (y == self.num_classes)
            logp = logp.masked_fill(~allowed, -math.inf)
        return logp, var

    def x0(self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Exact posterior mean ``E[x0 | x_t = x]`` (class-conditional if ``y`` is given;
        rows with ``y == num_classes`` are unconditional). Computed in float64."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        al = torch.as_tensor(alpha, dtype=torch.float64, device=xf.device).expand(b)
        sg = torch.as_tensor(sigma, dtype=torch.float64, device=xf.device).expand(b)
        logp, var = self._log_resp_terms(xf, al, sg, y)
        # Not torch.softmax: its multithreaded CPU kernel stalls for milliseconds on tiny
        # inputs when the cores are busy; this is the same normalized exponential.
        w = torch.exp(logp - logp.amax(dim=1, keepdim=True))
        w = w / w.sum(dim=1, keepdim=True)  # (B, K)
        mu, s2 = self.means.to(xf), self.stds.to(xf) ** 2
        a = al.view(-1, 1, 1)
        post = mu + a * s2 / var * (xf[:, None, :] - a * mu)  # (B, K, D)
        out = (w[:, :, None] * post).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0, y: Tensor | None = None) -> Tensor:
        """Exact log-density of the noisy marginal at ``x`` (``(B,)``, float64)."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        al = torch.full((b,), float(alpha), dtype=torch.float64, device=xf.device)
        sg = torch.full((b,), float(sigma), dtype=torch.float64, device=xf.device)
        logp, _ = self._log_resp_terms(xf, al, sg, y)
        return torch.logsumexp(logp, dim=1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        """Draw ``n`` data samples (of class ``y[i]`` if given), float64 on the CPU."""
        check_int("n", n, minimum=1)
        if y is None:
            comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            w = self.weights[None, :] * (self.labels[None, :] == y.view(-1, 1).cpu())
            comp = torch.multinomial(w, 1, generator=generator).flatten()
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[comp] + self.stds[comp] * z).reshape(n, *self.shape)

    def flow(self, x_s: Tensor, s: Knot, t: Knot) -> Tensor:
        """Exact probability-flow ODE map from ``s`` to ``t`` for a single Gaussian (K = 1):
        the standardized coordinate ``(x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` is
        constant along trajectories."""
        if self.means.shape[0] != 1:
            raise ValueError("the closed-form flow exists for a single Gaussian only")
        xf = x_s.reshape(x_s.shape[0], -1).to(torch.float64)
        mu, s2 = self.means[0].to(xf), self.stds[0].to(xf) ** 2
        z = (xf - s.alpha * mu) / torch.sqrt(s.alpha**2 * s2 + s.sigma**2)
        out = t.alpha * mu + torch.sqrt(t.alpha**2 * s2 + t.sigma**2) * z
        return out.reshape(x_s.shape).to(x_s.dtype)


def default_mixture(
    dim: int = 8,
    num_classes: int = 3,
    components_per_class: int = 2,
    seed: int = 0,
    shape: Sequence[int] = (),
) -> GaussianMixture:
    """A reproducible class-conditional mixture with image-like scale: means in [-0.8, 0.8],
    standard deviations in [0.05, 0.3]."""
    g = torch.Generator().manual_seed(seed)
    k = num_classes * components_per_class
    means = (torch.rand(k, dim, generator=g, dtype=torch.float64) * 2 - 1) * 0.8
    stds = 0.05 + 0.25 * torch.rand(k, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    labels = torch.arange(num_classes).repeat_interleave(components_per_class)
    return GaussianMixture(means, stds, weights, labels, num_classes, tuple(shape))


class MixtureDenoiser:
    """Exact (optionally guided) denoiser of a :class:`GaussianMixture`:
    ``D = D_u + w (D_c - D_u)`` for labels ``y`` and guidance weight ``w``."""

    def __init__(self, mixture: GaussianMixture, y: Tensor | None = None, guidance_scale: float = 1.0) -> None:
        self.mixture = mixture
        self.y = y
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        mix = self.mixture
        cond = mix.x0(x, knot.alpha, knot.sigma, self.y)
        if self.y is None or self.guidance_scale == 1.0:
            return cond
        uncond = mix.x0(x, knot.alpha, knot.sigma, None)
        return uncond + self.guidance_scale * (cond - uncond)


class MixtureNetwork:
    """A "network" that returns the exact prediction of a :class:`GaussianMixture` in any
    parameterization: ``net(x, t, y=None)`` with ``t`` the schedule's network time.

    Args:
        mixture: the data distribution.
        schedule: schedule whose ``model_time`` the caller uses.
        prediction: output type (default ``"eps"``).
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction: Prediction = "eps") -> None:
        self.mixture = mixture
        self.schedule = schedule
        self.prediction: Prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        tt = self.schedule.t_of_model_time(torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1))
        alpha = self.schedule.alpha(tt).expand(x.shape[0])
        sigma = self.schedule.sigma(tt).expand(x.shape[0])
        x0 = self.mixture.x0(x, alpha, sigma, y).to(torch.float64)
        shape = (-1,) + (1,) * (x.ndim - 1)
        cx, co = data_coefficients(self.prediction, alpha.view(shape), sigma.view(shape))  # type: ignore[arg-type]
        out = (x0 - cx * x.to(torch.float64)) / co
        return out.to(x.dtype)


# Dormand-Prince 5(4) tableau (Dormand & Prince 1980).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def reference_solve(
    denoiser: Denoiser,
    x: Tensor,
    start: Knot,
    end: Knot,
    schedule: NoiseSchedule,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> Tensor:
    """High-accuracy solution of the probability-flow ODE from ``start`` to ``end`` (both
    noisy knots, either direction) for a denoiser ``D(x, knot)``; float64.

    Integrates ``dx~/drho = x~ - D(alpha x~)`` in ``rho = log(sigma/alpha) = -lambda`` with
    adaptive Dormand-Prince 5(4) steps (local error per step below ``atol + rtol |x~|``).
    """
    if math.isinf(start.lam) or math.isinf(end.lam):
        raise ValueError("reference_solve needs finite noise levels at both ends")

    def f(rho: float, xt: Tensor) -> Tensor:
        k = schedule.knot_at_lambda(-rho)
        return xt - denoiser(k.alpha * xt, k).to(torch.float64)

    y = x.to(torch.float64) / start.alpha
    r, r_end = -start.lam, -end.lam
    direction = 1.0 if r_end > r else -1.0
    h = direction * min(0.01, abs(r_end - r))
    k1 = f(r, y)
    for _ in range(1_000_000):
        if (r_end - r) * direction <= 0:
            break
        if (r + h - r_end) * direction > 0:
            h = r_end - r
        ks = [k1]
        for i in range(1, 7):
            yi = y + h * sum(a * kj for a, kj in zip(_DP_A[i], ks, strict=False))
            ks.append(f(r + _DP_C[i] * h, yi))
        y5 = y + h * sum(b * kj for b, kj in zip(_DP_B5, ks, strict=True))
        y4 = y + h * sum(b * kj for b, kj in zip(_DP_B4, ks, strict=True))
        scale = atol + rtol * torch.maximum(y.abs(), y5.abs())
        err = float(((y5 - y4) / scale).abs().max())
        if err <= 1.0:
            r, y, k1 = r + h, y5, ks[6]
        factor = 0.9 * err ** (-0.2) if err > 0 else 5.0
        h *= min(5.0, max(0.2, factor))
    else:
        raise RuntimeError("reference_solve did not converge")
    return (end.alpha * y).to(x.dtype)


def reference_sample(
    denoiser: Denoiser, x_T: Tensor, schedule: NoiseSchedule, *, rtol: float = 1e-9, atol: float | None = None,
) -> Tensor:
    """The exact sample a sampler started at ``x_T`` (at ``schedule.t_max``) aims for: the
    probability-flow ODE solution at ``t_min`` (:func:`reference_solve`; ``atol`` defaults
    to ``rtol / 100``) followed by the data prediction there. A discrete-time network is
    only defined down to its last training time, so this is what "exact" can mean for it;
    every sampler's final data-prediction step aims at it."""
    start, end = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    x_end = reference_solve(denoiser, x_T, start, end, schedule, rtol=rtol, atol=rtol * 1e-2 if atol is None else atol)
    return denoiser(x_end, end)
