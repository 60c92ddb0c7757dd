"""A sampling problem of the suite (:mod:`.suite`): what every problem offers -- its
schedule, noise, labels, guided denoiser and reference sample -- so that the suite and the
peer configurations (:mod:`.peer_suite`) both build on it without importing each other."""

from __future__ import annotations

import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..analytic import exact_sample
from ..auto import Family
from ..auto import schedule_family as auto_family
from ..denoiser import Denoiser
from ..schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    Knot,
    NoiseSchedule,
    RectifiedFlowSchedule,
    VESchedule,
)

__all__ = [
    "Family",
    "Problem",
    "ReferenceCheck",
    "ScheduleName",
    "Split",
    "make_schedule_named",
    "name_seed",
    "schedule_family",
]

Split = Literal["selection", "held_out", "fresh"]
ScheduleName = Literal["sd", "vp_linear", "vp_cosine", "edm", "flow", "flow_shift3"]


def make_schedule_named(name: ScheduleName) -> NoiseSchedule:
    """The suite's schedules: ``sd`` (Stable Diffusion's discrete VP), ``vp_linear`` and
    ``vp_cosine`` (continuous VP), ``edm`` (VE, sigma in [0.002, 80]), ``flow`` and
    ``flow_shift3`` (rectified flow, SD3's shift 1 and 3)."""
    if name == "sd":
        return DiscreteVPSchedule()
    if name == "vp_linear":
        return ContinuousVPSchedule("linear")
    if name == "vp_cosine":
        return ContinuousVPSchedule("cosine")
    if name == "edm":
        return VESchedule(0.002, 80.0)
    if name == "flow":
        return RectifiedFlowSchedule(1.0)
    if name == "flow_shift3":
        return RectifiedFlowSchedule(3.0)
    raise ValueError(f"unknown schedule {name!r}")


def schedule_family(schedule: NoiseSchedule) -> Family:
    """Which peer configurations apply: the family of :func:`dpmsolver.auto.schedule_family`
    (``discrete``: DDPM-trained, diffusers' native schedules; ``vp``: continuous VP; ``ve``:
    alpha = 1; ``flow``: rectified flow), for the four schedule classes the peers know."""
    if not isinstance(
        schedule, (DiscreteVPSchedule, ContinuousVPSchedule, VESchedule, RectifiedFlowSchedule)
    ):
        raise TypeError(f"no family for {type(schedule).__name__}")
    return auto_family(schedule)


def name_seed(name: str) -> int:
    """A problem's seed: the CRC32 of its name (everything about it is built from that)."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class ReferenceCheck:
    """An exact sample and how exact it is.

    Attributes:
        sample: the reference at ``rtol``.
        rtol, loose_rtol: the two Dormand-Prince tolerances compared.
        error: RMS difference between the solutions at the two tolerances. It estimates the
            looser solve's error, so it bounds the reference's own error (about ten times
            smaller) from above.
        tolerance: the largest ``error`` accepted.
        evaluations: denoiser evaluations both solves spent.
        seconds: wall time of both solves.
    """

    sample: Tensor
    rtol: float
    loose_rtol: float
    error: float
    tolerance: float
    evaluations: int
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether the two tolerances agree to within ``tolerance``."""
        return self.error <= self.tolerance


class Problem(ABC):
    """One sampling problem: a schedule, a denoiser for any guidance scale and labels, a
    start state from standard normal noise and the exact sample.

    Attributes:
        name: unique, and the seed of everything random in the problem.
        split: ``"selection"`` (may be used to choose things), ``"held_out"`` (never) or
            ``"fresh"`` (never, and never looked at before the choices were final).
        kind: ``"mixture"`` (exact) or ``"network"`` (a trained model).
        schedule: the schedule samplers integrate on (``t_max`` to ``t_min``).
        shape: per-sample shape.
        num_classes: labels ``0..num_classes-1``.
        features: structural descriptors (the split is stratified over them).
        rtol, loose_rtol: the reference's two Dormand-Prince tolerances.
        reference_tolerance: the largest accepted difference between them (RMS).
    """

    name: str
    split: Split
    kind: str
    schedule: NoiseSchedule
    shape: tuple[int, ...]
    num_classes: int
    features: dict[str, Any]
    rtol: float
    loose_rtol: float
    reference_tolerance: float

    @property
    def family(self) -> Family:
        """The schedule family (:func:`schedule_family`)."""
        return schedule_family(self.schedule)

    @property
    def data_std(self) -> float:
        """The data's scale (per-coordinate standard deviation), for relative errors."""
        return float(self.features.get("data_std", 1.0))

    def labels(self, n: int, *, device: torch.device | str = "cpu") -> Tensor:
        """``n`` labels cycling through the classes."""
        return torch.arange(n, device=device) % self.num_classes

    def noise(
        self, n: int, seed: int | None = None, *, device: torch.device | str = "cpu"
    ) -> Tensor:
        """``n`` standard normal draws of the sample shape (float64). The default seed is
        the problem's own; choices scored on unseen noise pass another."""
        g = torch.Generator().manual_seed(name_seed(self.name) + 1 if seed is None else seed)
        z = torch.randn(n, *self.shape, generator=g, dtype=torch.float64)
        return z.to(device)

    def x_T(self, z: Tensor) -> Tensor:
        """The start state ``sigma(t_max) z`` (pure noise ``z`` for rectified flow, where
        ``t_max = 1`` has ``alpha = 0, sigma = 1``), as :func:`dpmsolver.sample` does."""
        return z * self.schedule.knot(self.schedule.t_max).sigma

    @abstractmethod
    def denoiser(self, guidance: float, labels: Tensor) -> Denoiser:
        """The (classifier-free-guided) denoiser ``D_u + w (D_c - D_u)`` for ``labels``."""

    def reference(self, denoiser: Denoiser, x_T: Tensor, rtol: float | None = None) -> Tensor:
        """The exact sample from ``x_T``: the probability-flow ODE solution at ``t_min``
        (Dormand-Prince at ``rtol``, default :attr:`rtol`) followed by the data prediction
        there (:func:`dpmsolver.analytic.exact_sample`)."""
        with torch.no_grad():
            return exact_sample(
                denoiser, x_T, self.schedule, rtol=self.rtol if rtol is None else rtol
            )

    def check_reference(
        self,
        denoiser: Denoiser,
        x_T: Tensor,
        *,
        rtol: float | None = None,
        loose_rtol: float | None = None,
    ) -> ReferenceCheck:
        """The reference at ``rtol`` (default :attr:`rtol`), compared with one at
        ``loose_rtol`` (default :attr:`loose_rtol`)."""
        calls = [0]

        def counted(x: Tensor, knot: Knot) -> Tensor:
            calls[0] += 1
            return denoiser(x, knot)

        tight = self.rtol if rtol is None else rtol
        loose_tol = self.loose_rtol if loose_rtol is None else loose_rtol
        start = time.perf_counter()
        ref = self.reference(counted, x_T, tight)
        loose = self.reference(counted, x_T, loose_tol)
        err = float(((ref.double() - loose.double()) ** 2).mean().sqrt())
        return ReferenceCheck(
            ref,
            tight,
            loose_tol,
            err,
            self.reference_tolerance,
            calls[0],
            time.perf_counter() - start,
        )
