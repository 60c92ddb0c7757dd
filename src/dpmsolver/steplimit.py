"""A per-sample bound on how far a higher-order step may depart from the first-order one.

Every data-prediction update is the first-order (DDIM) step plus higher-order terms built
from differences of data predictions (DPM-Solver++, Lu et al. 2022, Sec. 4; the expansion
in ``shared/ALGORITHMS.md``):

    x_t = x1 + c,    x1 = r x_s + (alpha_t - r alpha_s) x0_hat(x_s, s),    r = sigma_t / sigma_s

(``x1 = (sigma_t/sigma_s) x_s - alpha_t expm1(-h) x0_hat`` is
:func:`dpmsolver.solvers.first_order_step`, DDIM's step, which holds out of pure noise,
``alpha_s = 0``, too). On a smooth trajectory ``c`` is one order of
``h`` smaller than the first-order displacement ``d = x1 - x_s``. Under strong guidance a
single sample can leave the data; its stored predictions then differ wildly, ``c`` outgrows
``d`` and the multistep memory throws it farther at every step, while the rest of the
batch is fine. :class:`StepLimit` rescales, per sample, a correction with
``||c|| > kappa ||d||`` to ``kappa ||d||``; samples within the bound are returned bit for
bit. It is a safeguard in the spirit of a slope limiter, not a method from the papers: a
tuned profile carries it (:attr:`dpmsolver.tune.TuneOptions.step_limit`) and the records
in ``benchmarks/tuned*.md`` measure it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import Knot
from .solvers import Form, first_order_step

__all__ = ["StepLimit", "StepRatios", "check_step_limit", "departures"]


def check_step_limit(value: float | None, name: str = "step_limit") -> float | None:
    """``value`` if it is None or a finite number >= 1, else a ValueError naming ``name``
    (below 1 the limiter would cut a correction no larger than the step itself)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 1 or None, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 1.0:
        raise ValueError(f"{name} must be a finite number >= 1 or None, got {value!r}")
    return v


class StepLimit:
    """Bounds, per sample, a step's departure from the first-order step (module docstring).

    Args:
        kappa: the largest allowed ``||x_t - x1|| / ||x1 - x_s||`` (>= 1).
    """

    def __init__(self, kappa: float) -> None:
        checked = check_step_limit(kappa, "kappa")
        assert checked is not None
        self.kappa = checked

    def apply(self, x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot) -> Tensor:
        """``x_next`` (the step from ``x`` at ``s`` to ``t``, whose data prediction at ``s``
        is ``x0``) with each sample's correction held within ``kappa`` times its first-order
        displacement. A step into or out of a boundary (sigma = 0, or a zero-length step)
        is returned unchanged, and so is a sample with a non-finite norm, for the loop to
        report."""
        got = departures(x, x0, x_next, s, t)
        if got is None:
            return x_next
        x1, c, d = got
        over = (c > self.kappa * d) & torch.isfinite(c) & torch.isfinite(d)
        # where the correction is within bounds the factor is exactly 1: those rows stay as given
        factor = torch.where(over, self.kappa * d / torch.where(over, c, torch.ones_like(c)), 1.0)
        shape = (-1,) + (1,) * (x_next.ndim - 1)
        limited = x1 + (x_next - x1) * factor.to(x_next.dtype).view(shape)
        return torch.where(over.view(shape), limited, x_next)


def departures(
    x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The first-order step ``x1`` from ``x`` at ``s`` to ``t`` and, per sample, the norms
    of the correction ``||x_next - x1||`` and of the first-order displacement
    ``||x1 - x||`` (module docstring); None for a step into or out of a boundary, which
    :class:`StepLimit` leaves alone."""
    if not (math.isfinite(t.lam) and math.isfinite(s.sigma) and s.sigma > 0.0):
        return None
    x1 = first_order_step(Form.DATA, x, x0, x0, s, t)  # DDIM's own step
    wide = torch.promote_types(x_next.dtype, torch.float32)
    c = (x_next - x1).flatten(1).to(wide).norm(dim=1)
    d = (x1 - x).flatten(1).to(wide).norm(dim=1)
    return x1, c, d


class StepRatios(StepLimit):
    """A :class:`StepLimit` that limits nothing and records the largest ratio
    ``||x_next - x1|| / ||x1 - x||`` any sample reaches (finite ones only): what a limit
    calibrated on a pilot must stay above (:attr:`dpmsolver.tune.TuneOptions.step_limit_margin`)."""

    def __init__(self) -> None:
        self.kappa = math.inf
        self.largest = 0.0

    def apply(self, x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot) -> Tensor:
        got = departures(x, x0, x_next, s, t)
        if got is not None:
            _, c, d = got
            r = c / d
            r = r[torch.isfinite(r)]
            if r.numel():
                self.largest = max(self.largest, float(r.max()))
        return x_next
