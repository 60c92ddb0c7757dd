"""Adaptive step size DPM-Solver-12 / DPM-Solver-23 (Lu et al. 2022, "DPM-Solver", Sec. 4.2
and Alg. 4 in App. C).

Each attempt computes a singlestep solution of order k and the embedded one of order k-1
from the same evaluations, and accepts the step when the scaled difference

    E = max_batch rms((x_high - x_low) / max(atol, rtol max(|x_low|, |x_prev|)))

is at most 1. The next step in lambda is ``min(theta h E^(-1/k), lambda_end - lambda)``.
A rejected attempt re-uses the evaluation at its start point, so an attempt costs k
evaluations when it starts a new point and k - 1 when it retries one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._validate import check_choice, check_finite_float
from .base import Form, StepContext
from .registry import FORM_FAMILIES, SolverInfo, register
from .shapes import AdaptiveSolver
from .singlestep import singlestep_update

__all__ = ["AdaptiveDPMSolver"]


@dataclass(frozen=True)
class AdaptiveDPMSolver(AdaptiveSolver):
    """DPM-Solver-12 (``order=2``) or DPM-Solver-23 (``order=3``) with error control.

    Args:
        order: 2 or 3 (default 3).
        form: data (DPM-Solver++) or noise (DPM-Solver) prediction.
        rtol, atol: tolerances (defaults 0.05 and 0.0078, the paper's values for images in
            [-1, 1]).
        h_init: first trial step in lambda (default 0.05).
        theta: safety factor (default 0.9).
    """

    order: int = 3
    form: Form = Form.DATA
    rtol: float = 0.05
    atol: float = 0.0078
    h_init: float = 0.05
    theta: float = 0.9

    def __post_init__(self) -> None:
        check_choice("order", self.order, (2, 3))
        for name in ("rtol", "atol", "h_init", "theta"):
            check_finite_float(name, getattr(self, name), positive=True)

    def attempt(self, ctx: StepContext, x: Tensor, x0: Tensor) -> tuple[Tensor, Tensor]:
        """One attempt from ``ctx.s`` to ``ctx.t``: ``(x_high, x_low)``."""
        r1 = 0.5 if self.order == 2 else 1.0 / 3.0
        x_high, x_low = singlestep_update(
            ctx, self.form, x, x0, self.order, r1=r1, r2=2.0 / 3.0, variant="midpoint"
        )
        assert x_low is not None
        return x_high, x_low

    def error(self, x_high: Tensor, x_low: Tensor, x_prev: Tensor) -> float:
        """The scaled error norm E (one host synchronisation per attempt)."""
        delta = torch.maximum(
            torch.full_like(x_low, self.atol),
            self.rtol * torch.maximum(x_low.abs(), x_prev.abs()),
        )
        e = ((x_high - x_low) / delta).flatten(1).pow(2).mean(1).sqrt().max()
        return float(e)

    def next_h(self, h: float, err: float, remaining: float) -> float:
        """Step-size update (DPM-Solver, Alg. 4)."""
        factor = math.inf if err == 0.0 else self.theta * err ** (-1.0 / self.order)
        return min(h * factor, remaining)


for _prefix, _form, _label in FORM_FAMILIES:
    register(
        SolverInfo(
            name=f"{_prefix}_adaptive",
            cls=AdaptiveDPMSolver,
            fixed={"form": _form},
            orders=(2, 3),
            default_order=3,
            description=f"{_label}-12/23 adaptive step size with rtol/atol error control",
            reference="Lu et al. 2022, DPM-Solver Sec. 4.2, Alg. 4",
            configurations=({"order": 2}, {"order": 3}),
        )
    )
