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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._validate import check_choice, check_int
from .denoiser import Denoiser
from .parameterization import PREDICTIONS, Prediction, from_data
from .schedules import Knot, NoiseSchedule

__all__ = [
    "GaussianMixture",
    "LowRankMixture",
    "LowRankMixtureDenoiser",
    "MixtureDenoiser",
    "MixtureNetwork",
    "default_mixture",
    "exact_sample",
    "reference_sample",
    "reference_solve",
    "solve_from_pure_noise",
]


def _draw_components(
    weights: Tensor, labels: Tensor, n: int, generator: torch.Generator | None, y: Tensor | None
) -> Tensor:
    """The mixture component of each of ``n`` data samples, drawn with the mixture
    weights; with labels ``y``, row ``i`` among the components of class ``y[i]`` (the first
    draws of :meth:`GaussianMixture.sample` and :meth:`LowRankMixture.sample`)."""
    check_int("n", n, minimum=1)
    if y is None:
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    w = weights[None, :] * (labels[None, :] == y.view(-1, 1).cpu())
    return torch.multinomial(w, 1, generator=generator).flatten()


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
        logp = torch.log(self.weights.to(xf)) - 0.5 * (
            (diff * diff / var) + torch.log(2 * math.pi * var)
        ).sum(-1)
        if y is not None:
            y = y.to(xf.device).view(-1, 1)
            allowed = (self.labels.to(xf.device).view(1, -1) == y) | (y == self.num_classes)
            logp = logp.masked_fill(~allowed, -math.inf)
        return logp, var

    def x0(
        self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, y: Tensor | None = None
    ) -> Tensor:
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

    def log_prob(
        self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0, y: Tensor | None = None
    ) -> Tensor:
        """Exact log-density of the noisy marginal at ``x`` (``(B,)``, float64)."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        al = torch.full((b,), float(alpha), dtype=torch.float64, device=xf.device)
        sg = torch.full((b,), float(sigma), dtype=torch.float64, device=xf.device)
        logp, _ = self._log_resp_terms(xf, al, sg, y)
        return torch.logsumexp(logp, dim=1)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Draw ``n`` data samples (of class ``y[i]`` if given), float64 on the CPU."""
        comp = _draw_components(self.weights, self.labels, n, generator, y)
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

    def __init__(
        self, mixture: GaussianMixture, y: Tensor | None = None, guidance_scale: float = 1.0
    ) -> None:
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

    def __init__(
        self, mixture: GaussianMixture, schedule: NoiseSchedule, prediction: Prediction = "eps"
    ) -> None:
        self.mixture = mixture
        self.schedule = schedule
        self.prediction: Prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        tt = self.schedule.t_of_model_time(
            torch.as_tensor(t, dtype=torch.float64).cpu().reshape(-1)
        )
        # the schedule's arithmetic runs on the host; the coefficients go where x is
        alpha = self.schedule.alpha(tt).expand(x.shape[0]).to(x.device)
        sigma = self.schedule.sigma(tt).expand(x.shape[0]).to(x.device)
        x0 = self.mixture.x0(x, alpha, sigma, y).to(torch.float64)
        shape = (-1,) + (1,) * (x.ndim - 1)
        a, s = alpha.view(shape), sigma.view(shape)
        out = from_data(x0, x.to(torch.float64), a, s, self.prediction)  # type: ignore[arg-type]
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


def _dopri5(
    f: Callable[[float, Tensor], Tensor],
    y: Tensor,
    r: float,
    r_end: float,
    *,
    rtol: float,
    atol: float,
    h0: float,
    name: str = "the reference ODE solve",
) -> Tensor:
    """Adaptive Dormand-Prince 5(4) (Dormand & Prince 1980, the tableau above) for
    ``dy/dr = f(r, y)`` from ``r`` to ``r_end``, either direction, float64: the solver of
    :func:`reference_solve` and of :func:`solve_from_pure_noise`'s first segment.

    A step of size ``h`` (first ``h0``) is accepted when the embedded 5(4) error is below
    ``atol + rtol max(|y|, |y5|)`` elementwise; the next size is ``h`` times
    ``0.9 err^(-1/5)`` clipped to ``[0.2, 5]``, and the last step ends exactly at
    ``r_end``. The 5th-order solution is propagated (local extrapolation) and its last
    stage reused as the next step's first (FSAL). Raises a RuntimeError ("``name`` did not
    converge") after a million attempts."""
    direction = 1.0 if r_end > r else -1.0
    h = direction * min(h0, abs(r_end - r))
    k1 = f(r, y)
    for _ in range(1_000_000):
        if (r_end - r) * direction <= 0:
            return y
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
    raise RuntimeError(f"{name} did not converge")


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
    y = _dopri5(f, y, -start.lam, -end.lam, rtol=rtol, atol=atol, h0=0.01, name="reference_solve")
    return (end.alpha * y).to(x.dtype)


def reference_sample(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    rtol: float = 1e-9,
    atol: float | None = None,
) -> Tensor:
    """The exact sample a sampler started at ``x_T`` (at ``schedule.t_max``) aims for: the
    probability-flow ODE solution at ``t_min`` (:func:`reference_solve`; ``atol`` defaults
    to ``rtol / 100``) followed by the data prediction there. A discrete-time network is
    only defined down to its last training time, so this is what "exact" can mean for it;
    every sampler's final data-prediction step aims at it."""
    start, end = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    x_end = reference_solve(
        denoiser, x_T, start, end, schedule, rtol=rtol, atol=rtol * 1e-2 if atol is None else atol
    )
    return denoiser(x_end, end)


# --------------------------------------------------------------------------------------
# Mixtures with low-rank-plus-diagonal covariances
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankMixture:
    """A class-labelled Gaussian mixture with covariances ``U_k U_k^T + diag(d_k)``.

    Low-rank-plus-diagonal covariances cover isotropic (``U = 0``, constant ``d``),
    diagonal (``U = 0``), low-rank-plus-small-diagonal and ill-conditioned components. The
    noisy marginal is ``x_t | k ~ N(alpha mu_k, C_k)`` with
    ``C_k = alpha^2 U_k U_k^T + diag(alpha^2 d_k + sigma^2)``; the Woodbury identity gives
    ``C_k^{-1}`` and the matrix determinant lemma ``log det C_k`` through an ``r x r``
    capacitance matrix ``I + alpha^2 U_k^T diag(e_k)^{-1} U_k`` (``e_k = alpha^2 d_k +
    sigma^2``), so the exact posterior mean

        E[x0 | x_t] = sum_k w_k(x_t) [mu_k + alpha Sigma_k C_k^{-1} (x_t - alpha mu_k)]

    costs ``O(B K D r)`` per evaluation for a batch of ``B`` states in ``D`` dimensions.

    Attributes:
        means: ``(K, D)`` component means.
        factors: ``(K, D, r)`` low-rank factors ``U_k`` (``r`` may be 0).
        diag: ``(K, D)`` diagonal parts ``d_k`` (> 0).
        weights: ``(K,)`` mixture weights (normalized on construction).
        labels: ``(K,)`` class of each component, in ``[0, num_classes)``.
        num_classes: number of classes; label ``num_classes`` means "unconditional".
        shape: per-sample shape the flat vectors are reshaped to (default ``(D,)``).
    """

    means: Tensor
    factors: Tensor
    diag: Tensor
    weights: Tensor
    labels: Tensor
    num_classes: int
    shape: tuple[int, ...] = ()
    _device_cache: dict[torch.device, dict[str, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.means, dtype=torch.float64).cpu()
        if m.ndim != 2:
            raise ValueError("means must have shape (K, D)")
        k, d = m.shape
        u = torch.as_tensor(self.factors, dtype=torch.float64).cpu()
        if u.ndim != 3 or u.shape[:2] != (k, d):
            raise ValueError(f"factors must have shape (K, D, r) = ({k}, {d}, r)")
        dg = torch.as_tensor(self.diag, dtype=torch.float64).cpu().expand(k, d).clone()
        if not bool((dg > 0).all()):
            raise ValueError("diag must be > 0")
        w = torch.as_tensor(self.weights, dtype=torch.float64).cpu()
        lab = torch.as_tensor(self.labels, dtype=torch.long).cpu()
        if w.shape != (k,) or lab.shape != (k,):
            raise ValueError("weights and labels must have shape (K,)")
        if not bool((w > 0).all()):
            raise ValueError("weights must be > 0")
        if not bool((lab >= 0).all() and (lab < self.num_classes).all()):
            raise ValueError("labels must lie in [0, num_classes)")
        shape = tuple(self.shape) or (d,)
        if math.prod(shape) != d:
            raise ValueError(f"shape {shape} does not hold {d} values")
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "factors", u.contiguous())
        object.__setattr__(self, "diag", dg)
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "labels", lab)
        object.__setattr__(self, "shape", shape)

    @classmethod
    def from_diagonal(cls, mixture: GaussianMixture) -> LowRankMixture:
        """The same distribution as a diagonal :class:`GaussianMixture` (``U = 0``)."""
        k, d = mixture.means.shape
        return cls(
            mixture.means,
            torch.zeros(k, d, 0, dtype=torch.float64),
            mixture.stds**2,
            mixture.weights,
            mixture.labels,
            mixture.num_classes,
            mixture.shape,
        )

    @property
    def dim(self) -> int:
        """Flattened data dimension D."""
        return int(self.means.shape[1])

    @property
    def rank(self) -> int:
        """Rank r of the low-rank parts."""
        return int(self.factors.shape[2])

    def covariances(self) -> Tensor:
        """Dense ``(K, D, D)`` covariances (for small ``D``: tests and diagnostics)."""
        u = self.factors
        return u @ u.transpose(1, 2) + torch.diag_embed(self.diag)

    def data_std(self) -> float:
        """Root of the data's per-coordinate variance averaged over coordinates
        (``sqrt(trace(Cov[x0]) / D)``), the scale of the data."""
        w = self.weights
        mean = w @ self.means
        within = (w[:, None] * (self.diag + (self.factors**2).sum(-1))).sum(0)
        between = w @ (self.means - mean) ** 2
        return float(((within + between).mean()).sqrt())

    def _on(self, device: torch.device) -> dict[str, Tensor]:
        """Parameters on ``device`` (moved once per device and kept)."""
        cache = self._device_cache
        if device not in cache:
            u = self.factors.to(device)
            cache[device] = {
                "mu": self.means.to(device),
                "u": u,
                "ut": u.transpose(1, 2).contiguous(),
                "d": self.diag.to(device),
                "logw": torch.log(self.weights).to(device),
                "labels": self.labels.to(device),
            }
        return cache[device]

    def _components(self, xf: Tensor, a: float, s: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For one noise level ``(alpha, sigma) = (a, s)``: per-component log-likelihood
        terms ``(K, B)``, the diagonal ``e = a^2 d + s^2`` of ``C - a^2 U U^T`` and the
        Woodbury quantities ``c = cap^{-1} a U^T E^{-1} delta`` and ``U^T C^{-1} delta``
        (both ``(K, B, r)``), from which :meth:`_assemble` forms posterior means."""
        p = self._on(xf.device)
        mu, u, ut, d = p["mu"], p["u"], p["ut"], p["d"]
        kk, dim = mu.shape
        r = u.shape[2]
        e = a * a * d + s * s  # (K, D)
        inv_e = 1.0 / e
        # In place, in a kept buffer: allocating (K, B, D) temporaries costs more than the
        # arithmetic on them (fresh pages on every call). Differentiated (DPM-Solver-v3's
        # statistics take Jacobian products), the same arithmetic runs out of place:
        # autograd cannot follow out= and in-place squares.
        grad = torch.is_grad_enabled() and xf.requires_grad
        if grad:
            delta = torch.sub(xf[None, :, :], mu[:, None, :], alpha=a)  # (K, B, D)
        else:
            buf = p.get("buffer")
            if buf is None or buf.shape != (kk, xf.shape[0], dim) or buf.dtype != xf.dtype:
                buf = p["buffer"] = torch.empty(
                    kk, xf.shape[0], dim, dtype=xf.dtype, device=xf.device
                )
            delta = torch.sub(xf[None, :, :], mu[:, None, :], alpha=a, out=buf)
        uie = u * inv_e[:, :, None] if r > 0 else u  # E^{-1} U
        # U^T E^{-1} delta, before delta is squared in place
        q = torch.bmm(delta, uie) if r > 0 else None  # (K, B, r)
        # delta^T E^{-1} delta from delta itself: expanding it in x and mu cancels badly
        if grad:
            quad = (delta * delta * inv_e[:, None, :]).sum(-1)  # (K, B)
        else:
            quad = delta.mul_(delta).mul_(inv_e[:, None, :]).sum(-1)
        del delta
        logdet = torch.log(e).sum(-1)  # (K,)
        if q is not None:
            m = torch.bmm(ut, uie)  # (K, r, r) = U^T E^{-1} U
            eye = torch.eye(r, dtype=xf.dtype, device=xf.device)
            chol = torch.linalg.cholesky(eye + (a * a) * m)  # capacitance (Woodbury)
            c = torch.cholesky_solve((a * q).transpose(1, 2), chol).transpose(1, 2)
            quad = quad - a * (q * c).sum(-1)
            logdet = logdet + 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(-1)
            ug = q - a * torch.bmm(c, m)  # U^T C^{-1} delta (m is symmetric)
        else:
            c = ug = xf.new_zeros(kk, xf.shape[0], 0)
        logp = p["logw"][:, None] - 0.5 * (quad + logdet[:, None] + dim * math.log(2 * math.pi))
        return logp, e, c, ug

    def _assemble(
        self, xf: Tensor, w: Tensor, e: Tensor, c: Tensor, ug: Tensor, a: float
    ) -> Tensor:
        """``sum_k w_k [mu_k + a Sigma_k C_k^{-1} delta_k]`` for weights ``w`` (K, B).

        With ``C^{-1} delta = E^{-1} (delta - a U c)`` and ``Sigma = U U^T + diag(d)`` every
        term is a contraction over components (and ranks) of ``(B, K)`` or ``(B, K r)``
        weights with ``(K, D)`` or ``(K r, D)`` tables: no ``(K, B, D)`` tensor is formed.
        ``w`` may hold several weightings of the same rows side by side (``(K, n B)``).
        """
        p = self._on(xf.device)
        mu, ut, d = p["mu"], p["ut"], p["d"]
        kk, r, dim = ut.shape
        reps = w.shape[1] // xf.shape[0]
        xs = xf if reps == 1 else xf.repeat(reps, 1)
        de = d / e  # (K, D)
        wt = w.T  # (n B, K)
        # d * E^{-1} delta = (d/e) x - a (d/e) mu
        out = wt @ mu + a * (xs * (wt @ de) - a * (wt @ (de * mu)))
        if r > 0:
            c, ug = (c, ug) if reps == 1 else (c.repeat(1, reps, 1), ug.repeat(1, reps, 1))
            # rows (k, r) of the tables: U^T and U^T diag(d/e); columns of the weights: w u - a w c
            table_u = ut.reshape(kk * r, dim)
            table_ud = (ut * de[:, None, :]).reshape(kk * r, dim)
            wu = (w[:, :, None] * ug).permute(1, 0, 2).reshape(-1, kk * r)  # (n B, K r)
            wc = (w[:, :, None] * c).permute(1, 0, 2).reshape(-1, kk * r)
            out = out + a * (wu @ table_u - a * (wc @ table_ud))
        return out

    def _weights(self, logp: Tensor, y: Tensor | None) -> Tensor:
        """Normalized responsibilities ``(K, B)``, restricted to class ``y[b]`` per row."""
        if y is not None:
            lab = self._on(logp.device)["labels"]
            yy = y.to(logp.device).view(1, -1)
            allowed = (lab.view(-1, 1) == yy) | (yy == self.num_classes)
            logp = logp.masked_fill(~allowed, -math.inf)
        w = torch.exp(logp - logp.amax(dim=0, keepdim=True))
        return w / w.sum(dim=0, keepdim=True)

    def _levels(
        self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float
    ) -> list[tuple[float, float, Tensor]]:
        """Rows grouped by noise level: ``(alpha, sigma, row indices)`` per distinct pair."""
        b = x.shape[0]
        al = torch.as_tensor(alpha, dtype=torch.float64).flatten().cpu().expand(b)
        sg = torch.as_tensor(sigma, dtype=torch.float64).flatten().cpu().expand(b)
        if bool((al == al[0]).all() and (sg == sg[0]).all()):
            return [(float(al[0]), float(sg[0]), torch.arange(b))]
        pairs = torch.stack([al, sg], 1)
        uniq, inv = torch.unique(pairs, dim=0, return_inverse=True)
        return [
            (float(uniq[i, 0]), float(uniq[i, 1]), torch.nonzero(inv == i).flatten())
            for i in range(len(uniq))
        ]

    def x0(
        self, x: Tensor, alpha: Tensor | float, sigma: Tensor | float, y: Tensor | None = None
    ) -> Tensor:
        """Exact posterior mean ``E[x0 | x_t = x]`` (class-conditional if ``y`` is given;
        rows with ``y == num_classes`` are unconditional). Computed in float64 on ``x``'s
        device; ``alpha`` and ``sigma`` are scalars or one value per row."""
        return self.x0_guided(x, alpha, sigma, y, 1.0)

    def x0_guided(
        self,
        x: Tensor,
        alpha: Tensor | float,
        sigma: Tensor | float,
        y: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """Exact classifier-free-guided data prediction ``D_u + w (D_c - D_u)`` for labels
        ``y`` and weight ``w = guidance_scale``; both predictions share one pass over the
        components (they differ only in the responsibilities)."""
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        out = torch.empty_like(xf)
        w_scale = float(guidance_scale)
        for a, s, rows in self._levels(x, alpha, sigma):
            rows = rows.to(xf.device)
            xr = xf if len(rows) == b else xf[rows]
            yr = (
                None
                if y is None
                else (y.to(xf.device) if len(rows) == b else y.to(xf.device)[rows])
            )
            logp, e, c, ug = self._components(xr, a, s)
            if yr is not None and w_scale != 1.0:
                # both weightings in one pass: the components' terms are shared
                both = torch.cat([self._weights(logp, yr), self._weights(logp, None)], dim=1)
                cond, uncond = self._assemble(xr, both, e, c, ug, a).chunk(2)
                cond = uncond + w_scale * (cond - uncond)
            else:
                cond = self._assemble(xr, self._weights(logp, yr), e, c, ug, a)
            if len(rows) == b:
                out = cond
            else:
                out[rows] = cond
        return out.reshape(x.shape).to(x.dtype)

    def log_prob(
        self, x: Tensor, alpha: float = 1.0, sigma: float = 0.0, y: Tensor | None = None
    ) -> Tensor:
        """Exact log-density of the noisy marginal at ``x`` (``(B,)``, float64)."""
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        logp = self._components(xf, float(alpha), float(sigma))[0]
        if y is not None:
            lab = self._on(xf.device)["labels"]
            yy = y.to(xf.device).view(1, -1)
            logp = logp.masked_fill(
                ~((lab.view(-1, 1) == yy) | (yy == self.num_classes)), -math.inf
            )
        return torch.logsumexp(logp, dim=0)

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, y: Tensor | None = None
    ) -> Tensor:
        """Draw ``n`` data samples (of class ``y[i]`` if given), float64 on the CPU."""
        comp = _draw_components(self.weights, self.labels, n, generator, y)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        zr = torch.randn(n, self.rank, 1, dtype=torch.float64, generator=generator)
        low = torch.bmm(self.factors[comp], zr)[:, :, 0] if self.rank > 0 else 0.0
        return (self.means[comp] + self.diag[comp].sqrt() * z + low).reshape(n, *self.shape)


class LowRankMixtureDenoiser:
    """Exact (optionally guided) denoiser of a :class:`LowRankMixture`, used exactly like
    :class:`MixtureDenoiser`: ``D(x, knot) = D_u + w (D_c - D_u)`` for per-row labels ``y``
    and guidance weight ``w`` (float64 arithmetic on ``x``'s device)."""

    def __init__(
        self, mixture: LowRankMixture, y: Tensor | None = None, guidance_scale: float = 1.0
    ) -> None:
        self.mixture = mixture
        self.y = y
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        return self.mixture.x0_guided(x, knot.alpha, knot.sigma, self.y, self.guidance_scale)


# --------------------------------------------------------------------------------------
# Reference solutions from pure noise (rectified flow starts at alpha = 0)
# --------------------------------------------------------------------------------------


def solve_from_pure_noise(
    denoiser: Denoiser,
    x: Tensor,
    start: Knot,
    end: Knot,
    schedule: NoiseSchedule,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-12,
    lam_switch: float = 0.0,
) -> Tensor:
    """High-accuracy probability-flow ODE solution from a pure-noise knot (``alpha = 0``,
    ``lambda = -inf``; rectified flow at ``t = 1``) to the noisy knot ``end``; float64.

    :func:`reference_solve`'s variable ``x / alpha`` is infinite at pure noise. Here the
    first segment uses ``y = x / sigma`` against ``u = alpha / sigma = e^lambda``, in which
    the ODE is ``dy/du = D(sigma y)`` (the data-prediction form of the exact solution,
    ``x_t / sigma_t = x_s / sigma_s + Int e^lambda x0_hat dlambda``), regular at ``u = 0``
    where ``D`` is the prior's (class) mean. It runs adaptive Dormand-Prince steps up to
    ``lambda = lam_switch`` (default 0, or halfway to ``end``), then hands over to
    :func:`reference_solve`.
    """
    if start.alpha != 0.0 or not math.isinf(start.lam) or start.lam > 0:
        raise ValueError("solve_from_pure_noise starts at pure noise (alpha = 0, lambda = -inf)")
    if math.isinf(end.lam):
        raise ValueError("solve_from_pure_noise needs a finite noise level at the end")
    lam1 = min(lam_switch, end.lam - 1.0)

    def f(u: float, yy: Tensor) -> Tensor:
        k = start if u <= 0.0 else schedule.knot_at_lambda(math.log(u))
        return denoiser(k.sigma * yy, k).to(torch.float64)

    y = x.to(torch.float64) / start.sigma
    y = _dopri5(f, y, 0.0, math.exp(lam1), rtol=rtol, atol=atol, h0=0.01)
    mid = schedule.knot_at_lambda(lam1)
    return reference_solve(denoiser, mid.sigma * y, mid, end, schedule, rtol=rtol, atol=atol).to(
        x.dtype
    )


def exact_sample(
    denoiser: Denoiser,
    x_T: Tensor,
    schedule: NoiseSchedule,
    *,
    rtol: float = 1e-9,
    atol: float | None = None,
) -> Tensor:
    """:func:`reference_sample` for every schedule, including those whose first time is
    pure noise (rectified flow at ``t = 1``, via :func:`solve_from_pure_noise`): the
    probability-flow ODE solution from ``t_max`` to ``t_min`` followed by the data
    prediction there. Where ``reference_sample`` applies, the result is its result."""
    start, end = schedule.knot(schedule.t_max), schedule.knot(schedule.t_min)
    if not math.isinf(start.lam):
        return reference_sample(denoiser, x_T, schedule, rtol=rtol, atol=atol)
    a = rtol * 1e-2 if atol is None else atol
    x_end = solve_from_pure_noise(denoiser, x_T, start, end, schedule, rtol=rtol, atol=a)
    return denoiser(x_end, end)
