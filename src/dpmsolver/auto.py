"""The recommended configuration for a budget and a guidance scale (``solver="auto"``).

A :class:`Recipe` is a solver, its options, a time grid and where to stop, chosen per
(NFE, guidance) cell from the measurements of ``dpmsolver bench`` (exact Gaussian mixture
and the built-in digits network, side by side with diffusers and k-diffusion; see the
README). The table below is that choice; ``benchmarks/`` records the numbers behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._validate import check_finite_float, check_int
from .schedules import NoiseSchedule

__all__ = ["Recipe", "recommend"]


@dataclass(frozen=True)
class Recipe:
    """A complete sampler configuration.

    Attributes:
        solver: registry name or alias.
        options: solver options (order included).
        grid: time-grid kind; ``rho`` its exponent where it has one.
        sigma_end: k-diffusion sigma (sigma/alpha) of the last noisy knot, or None for the
            schedule's ``t_min``; stopping earlier pays off when evaluations are scarce.
        final_step: ``"denoise"`` or ``"extrapolate"`` (see :func:`dpmsolver.solve`).
    """

    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    grid: str = "logsnr"
    rho: float | None = None
    sigma_end: float | None = None
    final_step: str = "extrapolate"

    def t_end(self, schedule: NoiseSchedule) -> float | None:
        """``sigma_end`` as a time of ``schedule`` (clamped to its range), or None."""
        if self.sigma_end is None:
            return None
        t = schedule.knot_at_lambda(-math.log(self.sigma_end)).t
        return min(max(t, schedule.t_min), schedule.t_max)

    def describe(self) -> str:
        """One line for logs and tables."""
        opts = "".join(f" {k}={v}" for k, v in self.options.items())
        extra = f" rho={self.rho}" if self.rho is not None else ""
        stop = f" sigma_end={self.sigma_end}" if self.sigma_end is not None else ""
        return f"{self.solver}{opts} [{self.grid}{extra}]{stop} final={self.final_step}"


# (max NFE, max guidance) -> recipe; the first row whose bounds admit the request wins.
_TABLE: list[tuple[int, float, Recipe]] = [
    (5, math.inf, Recipe("dpmpp_fast", {"order": 3}, "time_quadratic", sigma_end=0.14)),
    (7, math.inf, Recipe("dpm_2m", {}, "logsnr", sigma_end=0.14)),
    (9, math.inf, Recipe("dpm_3m", {}, "logsnr", sigma_end=0.14)),
    (10**9, math.inf, Recipe("dpm_3m", {}, "polyexponential", rho=0.7)),
]


def recommend(nfe: int, guidance_scale: float = 1.0) -> Recipe:
    """The recipe for ``nfe`` network evaluations at classifier-free guidance
    ``guidance_scale`` (1 = unguided)."""
    check_int("nfe", nfe, minimum=1)
    w = check_finite_float("guidance_scale", guidance_scale)
    for max_nfe, max_w, recipe in _TABLE:
        if nfe <= max_nfe and w <= max_w:
            return recipe
    return _TABLE[-1][2]
