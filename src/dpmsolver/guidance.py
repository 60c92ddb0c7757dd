"""Guidance and correctors, as wrappers.

- :class:`ClassifierFreeGuidance` wraps a *network*: conditional and unconditional rows go
  through one batched call (one evaluation), and the outputs are combined as
  ``out = out_u + w (out_c - out_u)`` (Ho & Salimans 2022, Eq. 6). Because every
  parameterization is affine in the output, this equals guidance on eps or on x0.
- :class:`ClassifierGuidance`, :class:`DynamicThresholding`, :class:`NormCap` and
  :class:`X0Corrector` wrap a *denoiser* (``x0_hat = D(x, knot)``).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._validate import check_finite_float
from .denoiser import Denoiser, Network, time_tensor
from .schedules import Knot

__all__ = [
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "DynamicThresholding",
    "NormCap",
    "X0Corrector",
]


def _check_scale(name: str, scale: float | Tensor) -> float | Tensor:
    if isinstance(scale, Tensor):
        if scale.ndim != 1:
            raise ValueError(
                f"{name} as a tensor must have shape (batch,), got {tuple(scale.shape)}"
            )
        if not bool(torch.isfinite(scale).all()):
            raise ValueError(f"{name} must be finite, got {scale}")
        return scale
    return check_finite_float(name, scale)


def _batch_view(scale: float | Tensor, like: Tensor) -> float | Tensor:
    if isinstance(scale, Tensor):
        if scale.shape[0] != like.shape[0]:
            raise ValueError(
                f"guidance scale has {scale.shape[0]} entries but the batch has {like.shape[0]}"
            )
        return scale.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))
    return scale


def _cat_rows(name: str, uncond: Any, cond: Any, batch: int) -> Any:
    """Stack the unconditional rows on top of the conditional ones for one batched call."""
    if isinstance(cond, Tensor) != isinstance(uncond, Tensor):
        raise ValueError(f"conditioning '{name}': cond and uncond must both be tensors or neither")
    if not isinstance(cond, Tensor):
        if cond != uncond:
            raise ValueError(
                f"conditioning '{name}': non-tensor values must match in cond and uncond"
            )
        return cond
    parts = []
    for label, v in (("uncond", uncond), ("cond", cond)):
        if v.shape[0] == 1 and batch != 1:
            v = v.expand(batch, *v.shape[1:])
        if v.shape[0] != batch:
            raise ValueError(
                f"conditioning '{name}' ({label}) has batch {v.shape[0]}, expected {batch} or 1"
            )
        parts.append(v)
    if parts[0].shape[1:] != parts[1].shape[1:]:
        raise ValueError(
            f"conditioning '{name}': cond shape {tuple(cond.shape[1:])} and uncond shape "
            f"{tuple(uncond.shape[1:])} differ"
        )
    return torch.cat(parts, dim=0)


class ClassifierFreeGuidance:
    """Classifier-free guidance around a network (Ho & Salimans 2022).

    ``scale = 1`` is the plain conditional model and skips the unconditional half. Scales
    follow the ``eps_u + w (eps_c - eps_u)`` convention (diffusers' ``guidance_scale``).

    Args:
        model: ``model(x, t, **kwargs) -> output``.
        scale: guidance weight ``w``: a float or a ``(batch,)`` tensor of per-sample weights.
        cond: keyword arguments of the conditional call (e.g. ``{"y": labels}``).
        uncond: keyword arguments of the unconditional call, same keys as ``cond``.
    """

    def __init__(
        self,
        model: Network,
        scale: float | Tensor,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.scale = _check_scale("guidance_scale", scale)
        if set(cond) != set(uncond):
            raise ValueError(
                f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}"
            )
        self.cond = dict(cond)
        self.uncond = dict(uncond)

    @property
    def skips_unconditional(self) -> bool:
        """True when the scale is exactly 1 and only the conditional call is needed."""
        return not isinstance(self.scale, Tensor) and self.scale == 1.0

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        if self.skips_unconditional:
            return self.model(x, t, **self.cond, **kwargs)
        b = x.shape[0]
        both = {k: _cat_rows(k, self.uncond[k], self.cond[k], b) for k in self.cond}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both, **kwargs)
        out = out.to(torch.promote_types(out.dtype, torch.float32))
        out_u, out_c = out[:b], out[b:]
        return out_u + _batch_view(self.scale, out_u) * (out_c - out_u)


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 in eps form).

    ``eps <- eps - w sigma grad log p(c | x_t)``; on the data prediction this is
    ``x0 <- x0 + w (sigma^2 / alpha) grad``. No guidance is applied at pure noise
    (``alpha = 0``), where the data prediction carries no information about ``x_t``.

    Args:
        denoiser: the denoiser to guide.
        log_prob: ``log_prob(x, t, **kwargs) -> (B,)`` log-probability of the target class
            under a noisy classifier, differentiable in ``x``; ``t`` is the network time.
        scale: guidance weight ``w`` (float or ``(batch,)`` tensor).
        kwargs: extra keyword arguments for ``log_prob`` (e.g. the target labels).
    """

    def __init__(
        self,
        denoiser: Denoiser,
        log_prob: Callable[..., Tensor],
        scale: float | Tensor,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.log_prob = log_prob
        self.scale = _check_scale("classifier_scale", scale)
        self.kwargs = dict(kwargs or {})

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        x0 = self.denoiser(x, knot)
        if knot.alpha == 0.0:
            return x0
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logp = self.log_prob(x_in, time_tensor(x, knot.model_t), **self.kwargs)
            if logp.shape != (x.shape[0],):
                raise ValueError(
                    f"log_prob must return shape ({x.shape[0]},), got {tuple(logp.shape)}"
                )
            (grad,) = torch.autograd.grad(logp.sum(), x_in)
        coef = knot.sigma * knot.sigma / knot.alpha
        return x0 + _batch_view(self.scale, x0) * coef * grad.to(x0.dtype)


def _quantile_rows(v: Tensor, q: float) -> Tensor:
    """Per-row linear-interpolation quantile (as torch.quantile) without its size limit."""
    n = v.shape[1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = torch.kthvalue(v, lo + 1, dim=1).values
    if hi == lo or pos == lo:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1, dim=1).values
    return v_lo + (pos - lo) * (v_hi - v_lo)


class DynamicThresholding:
    """Dynamic thresholding of the data prediction (Saharia et al. 2022, "Imagen", Sec. 2.3;
    DPM-Solver++, Sec. 5).

    Per sample, ``s = clamp(quantile(|x0|, ratio), 1, max_value)`` and
    ``x0 <- clamp(x0, -s, s) / s`` (diffusers' convention). The quantile is computed in
    float32 or better so half-precision states work.

    Args:
        denoiser: the denoiser to threshold.
        ratio: quantile of absolute pixel values (default 0.995).
        max_value: upper bound for ``s`` (default 1.0, i.e. static clipping to [-1, 1]).
    """

    def __init__(self, denoiser: Denoiser, ratio: float = 0.995, max_value: float = 1.0) -> None:
        self.denoiser = denoiser
        self.ratio = check_finite_float("thresholding_ratio", ratio, positive=True)
        if self.ratio > 1.0:
            raise ValueError(f"thresholding_ratio must be in (0, 1], got {ratio}")
        self.max_value = check_finite_float("thresholding_max_value", max_value, positive=True)
        if self.max_value < 1.0:
            raise ValueError(f"thresholding_max_value must be >= 1, got {max_value}")

    def threshold(self, x0: Tensor) -> Tensor:
        """Apply the thresholding to a batch of data predictions."""
        work = x0.to(torch.promote_types(x0.dtype, torch.float32))
        flat = work.reshape(work.shape[0], -1)
        s = _quantile_rows(flat.abs(), self.ratio).clamp(1.0, self.max_value)
        s = s.view(-1, *([1] * (work.ndim - 1)))
        return (torch.maximum(torch.minimum(work, s), -s) / s).to(x0.dtype)

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        return self.threshold(self.denoiser(x, knot))


class NormCap:
    """A per-sample bound on the data prediction's norm, by log-SNR: where
    ``||x0_hat|| > cap(lambda)`` the sample's prediction is scaled down to the cap.

    Why: under strong classifier-free guidance the guided field off the data grows with
    the distance from it, so one sample that a large step throws off (rarely: about one in
    500 to 4000 at guidance 15) keeps being thrown farther and ends thousands of data
    spreads away, while the rest are fine. The data-prediction update is a convex
    combination of the state and ``x0_hat`` (DPM-Solver++, Eq. 9), so bounding
    ``x0_hat`` bounds the state, and the sample comes back to the data region. Unlike
    dynamic thresholding (Saharia et al. 2022, Sec. 2.3), which needs a known pixel range,
    the cap is measured: :func:`dpmsolver.tune.tune` sets it a factor above the largest
    norm along the exact guided trajectories of the pilot
    (:attr:`dpmsolver.recipe.Recipe.x0_norm_cap`), so on the samples that stay near those
    trajectories it does not bind.

    Args:
        denoiser: the denoiser to bound.
        cap: ``(lambda, cap)`` knots, lambda increasing; the cap is interpolated linearly in
            lambda between knots and held constant beyond the ends.
    """

    def __init__(self, denoiser: Denoiser, cap: Sequence[tuple[float, float]]) -> None:
        self.denoiser = denoiser
        self.lams, self.caps = check_norm_cap(cap)

    def cap_at(self, lam: float) -> float:
        """The bound at half log-SNR ``lam`` (``+-inf`` take the end values)."""
        lams, caps = self.lams, self.caps
        if not lam > lams[0]:  # also -inf (pure noise)
            return caps[0]
        if lam >= lams[-1]:
            return caps[-1]
        j = bisect.bisect_right(lams, lam)
        u = (lam - lams[j - 1]) / (lams[j] - lams[j - 1])
        return caps[j - 1] + u * (caps[j] - caps[j - 1])

    def bound(self, x0: Tensor, lam: float) -> Tensor:
        """``x0`` with every sample's norm at most :meth:`cap_at` ``(lam)``; non-finite
        samples pass unchanged (the loop reports them)."""
        cap = self.cap_at(lam)
        norms = x0.reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
        norms = torch.linalg.vector_norm(norms, dim=1)
        over = torch.isfinite(norms) & (norms > cap)
        scale = torch.where(over, cap / norms, torch.ones_like(norms))
        return x0 * scale.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        return self.bound(self.denoiser(x, knot), knot.lam)


def check_norm_cap(
    cap: Sequence[tuple[float, float]], name: str = "x0_norm_cap"
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(lambdas, caps)`` of a :class:`NormCap`'s knots, or a ValueError naming ``name``:
    at least one knot, finite strictly increasing lambdas, finite positive caps."""
    try:
        pairs = [(float(a), float(b)) for a, b in cap]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of (lambda, cap) pairs, got {cap!r}") from None
    lams = tuple(a for a, _ in pairs)
    caps = tuple(b for _, b in pairs)
    if not pairs:
        raise ValueError(f"{name} needs at least one (lambda, cap) pair")
    if not all(math.isfinite(v) for v in lams + caps) or min(caps) <= 0.0:
        raise ValueError(f"{name}: lambdas and caps must be finite and caps > 0, got {pairs}")
    if any(b <= a for a, b in itertools.pairwise(lams)):
        raise ValueError(f"{name}: lambdas must increase strictly, got {list(lams)}")
    return lams, caps


class X0Corrector:
    """A user correction of the data prediction: ``x0 <- fn(x0, x, knot)``.

    Use it for projections or constraints (inpainting masks, clipping, consistency
    tricks); it sees every evaluation, including the intermediate ones of singlestep solvers.
    """

    def __init__(self, denoiser: Denoiser, fn: Callable[[Tensor, Tensor, Knot], Tensor]) -> None:
        self.denoiser = denoiser
        self.fn = fn

    def __call__(self, x: Tensor, knot: Knot) -> Tensor:
        x0 = self.denoiser(x, knot)
        out = self.fn(x0, x, knot)
        if not isinstance(out, Tensor) or out.shape != x0.shape:
            raise ValueError("x0 corrector must return a tensor of the data prediction's shape")
        return out
