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

A ratio to ``||d||`` cannot tell a runaway from the large corrections ordinary samples
make at the last steps, where ``d`` is tiny (``benchmarks/step_limit_calibrated.md``). The
*envelope* bounds the correction's own norm instead, step by step: ``||c|| <= e_i`` at
step ``i``, with ``e_i`` a margin times the largest ``||c||`` any pilot row makes at that
step under the same recipe (:attr:`dpmsolver.tune.TuneOptions.envelope_margin`;
``benchmarks/correction_envelope.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from ._validate import check_finite_floats, check_int
from .schedules import Knot
from .solvers import Form, first_order_step

__all__ = [
    "StepHook",
    "StepLimit",
    "StepRatios",
    "check_step_envelope",
    "check_step_limit",
    "departures",
]


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


def check_step_envelope(
    value: Sequence[float] | None, name: str = "step_envelope"
) -> tuple[float, ...] | None:
    """``value`` as a tuple if it is None or a sequence of finite numbers >= 0 (0: no bound
    at that step), else a ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a sequence of numbers >= 0, one per step, or None")
    return check_finite_floats(name, value, minimum=0.0)


class StepHook(Protocol):
    """What the sampling loop calls after each deterministic solver step
    (:func:`dpmsolver.loop.solve`'s ``step_limit``): the step's end, possibly changed."""

    def apply(
        self, x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot, index: int
    ) -> Tensor: ...


class StepLimit:
    """Bounds, per sample, a step's departure from the first-order step (module docstring).

    Args:
        kappa: the largest allowed ``||x_t - x1|| / ||x1 - x_s||`` (>= 1), or None for no
            such bound.
        envelope: per step, first to last, the largest allowed ``||x_t - x1||`` (0: no
            bound at that step), or None.
        persistence: the envelope binds on a sample only once its correction has been over
            it at this many consecutive steps, and from then on at every step (1: wherever
            it is over). A runaway's excess grows from step to step; an ordinary sample
            from the tail of the data may exceed it once.
    """

    def __init__(
        self,
        kappa: float | None,
        envelope: Sequence[float] | None = None,
        persistence: int = 1,
    ) -> None:
        checked = check_step_limit(kappa, "kappa")
        self.kappa: float = math.inf if checked is None else checked
        self.envelope = check_step_envelope(envelope, "envelope")
        if kappa is None and self.envelope is None:
            raise ValueError("StepLimit needs kappa, envelope or both")
        self.persistence = check_int("persistence", persistence, minimum=1)
        # per step index: each sample's run of consecutive steps over the envelope, and
        # whether the envelope binds on it from then on (indexed, not counted, because a
        # step may be tried more than once before it is taken: stage (g)'s fit)
        self._runs: dict[int, Tensor] = {}
        self._bound: dict[int, Tensor] = {}

    def apply(self, x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot, index: int) -> Tensor:
        """``x_next`` (the step ``index`` from ``x`` at ``s`` to ``t``, whose data
        prediction at ``s`` is ``x0``) with each sample's correction held within ``kappa``
        times its first-order displacement and within the envelope's bound for the step. A
        step into or out of a boundary (sigma = 0, or a zero-length step) is returned
        unchanged, and so is a sample with a non-finite norm, for the loop to report."""
        got = departures(x, x0, x_next, s, t)
        if got is None:
            return x_next
        x1, c, d = got
        bound = self.kappa * d
        if self.envelope is not None:
            if index >= len(self.envelope):
                raise ValueError(
                    f"the step envelope has {len(self.envelope)} entries but step {index} "
                    "was taken; it belongs to another plan"
                )
            if self.envelope[index] > 0.0:
                capped = torch.clamp(bound, max=self.envelope[index])
                bound = torch.where(self._binds(c, index), capped, bound)
        over = (c > bound) & torch.isfinite(c) & torch.isfinite(d)
        # where the correction is within bounds the factor is exactly 1: those rows stay as given
        factor = torch.where(over, bound / torch.where(over, c, torch.ones_like(c)), 1.0)
        shape = (-1,) + (1,) * (x_next.ndim - 1)
        limited = x1 + (x_next - x1) * factor.to(x_next.dtype).view(shape)
        return torch.where(over.view(shape), limited, x_next)

    def _binds(self, c: Tensor, index: int) -> Tensor:
        """Per sample, whether the envelope binds at step ``index`` (``persistence``)."""
        assert self.envelope is not None
        over = (c > self.envelope[index]) & torch.isfinite(c)
        if self.persistence == 1:
            return over
        if index == 0:  # a new run
            self._runs.clear()
            self._bound.clear()
        zeros = torch.zeros_like(c, dtype=torch.long)
        before = self._runs.get(index - 1, zeros)
        runs = torch.where(over, before + 1, zeros)
        binds = self._bound.get(index - 1, zeros.bool()) | (runs >= self.persistence)
        self._runs[index], self._bound[index] = runs, binds
        return binds


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


class StepRatios:
    """A probe for the loop's step hook: it runs ``limit`` (None: nothing) and records, of
    the steps as taken, the largest ratio ``||x_next - x1|| / ||x1 - x||`` any sample
    reaches and, per step, the largest correction norm ``||x_next - x1||`` and the largest
    first-order displacement ``||x1 - x||`` (finite ones only; 0 for a step it did not
    see): what a limit or an envelope calibrated on a pilot must stay above
    (:attr:`dpmsolver.tune.TuneOptions.step_limit_margin`,
    :attr:`~dpmsolver.tune.TuneOptions.envelope_margin`)."""

    def __init__(self, limit: StepLimit | None = None) -> None:
        self.limit = limit
        self.largest = 0.0
        self.corrections: list[float] = []
        self.displacements: list[float] = []

    def apply(self, x: Tensor, x0: Tensor, x_next: Tensor, s: Knot, t: Knot, index: int) -> Tensor:
        if self.limit is not None:
            x_next = self.limit.apply(x, x0, x_next, s, t, index)
        while len(self.corrections) <= index:
            self.corrections.append(0.0)
            self.displacements.append(0.0)
        got = departures(x, x0, x_next, s, t)
        if got is not None:
            _, c, d = got
            r = c / d
            r = r[torch.isfinite(r)]
            if r.numel():
                self.largest = max(self.largest, float(r.max()))
            for seen, v in ((self.corrections, c), (self.displacements, d)):
                v = v[torch.isfinite(v)]
                if v.numel():
                    seen[index] = max(seen[index], float(v.max()))
        return x_next
